// Crop-region, DCT-scaled JPEG decoding and a cheaper crop + resize, for FFCV's numba pipelines.
//
// Written by hand because no kept library offers it without the GIL: FFCV's own crop re-encodes the
// JPEG losslessly first (slower than a full decode), and OpenCV, PIL and simplejpeg decode whole images.
// libjpeg's partial decoding does the job: jpeg_crop_scanline (columns) and jpeg_skip_scanlines (rows),
// with scale_denom for the DCT scaling. The functions are called from numba through ctypes (see
// crop_decode.py); each thread keeps its own decompressor, and libjpeg's longjmp error handling never
// leaves this file.
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <jpeglib.h>
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>

namespace {

struct ErrorManager {
    jpeg_error_mgr pub;
    jmp_buf jump;
};

void on_error(j_common_ptr cinfo) { longjmp(reinterpret_cast<ErrorManager*>(cinfo->err)->jump, 1); }
void on_message(j_common_ptr, int) {}   // warnings (e.g. a truncated file) stay silent, as in FFCV
void on_output(j_common_ptr) {}

// libjpeg's error manager with errors turned into a longjmp to errors.jump and warnings silenced.
jpeg_error_mgr* quiet_errors(ErrorManager& errors) {
    jpeg_error_mgr* manager = jpeg_std_error(&errors.pub);
    errors.pub.error_exit = on_error;
    errors.pub.emit_message = on_message;
    errors.pub.output_message = on_output;
    return manager;
}

struct Decompressor {
    jpeg_decompress_struct cinfo;
    ErrorManager errors;
    std::vector<uint8_t> row;      // one decoded row of the (column-cropped) output
    std::vector<uint8_t> window;   // the decoded window, packed RGB
    bool ready = false;            // false when libjpeg could not set it up: every decode then fails cleanly
    Decompressor() : cinfo() {
        cinfo.err = quiet_errors(errors);
        if (setjmp(errors.jump)) return;   // e.g. a libjpeg whose structures differ from the headers'
        jpeg_create_decompress(&cinfo);
        ready = true;
    }
    ~Decompressor() { jpeg_destroy_decompress(&cinfo); }
};

thread_local Decompressor decompressor;

// Work counters for the benchmark reports, summed over all threads (crop_decode.COUNTERS names them in
// the order of `counters`).
std::atomic<uint64_t> samples{0}, decoded_pixels{0}, stored_pixels{0}, output_pixels{0}, full_decodes{0},
    scaled_decodes{0}, failures{0}, restart_decodes{0}, entropy_bytes{0}, entropy_bytes_read{0};
std::atomic<uint64_t>* const counters[] = {&samples, &decoded_pixels, &stored_pixels, &output_pixels,
                                           &full_decodes, &scaled_decodes, &failures, &restart_decodes,
                                           &entropy_bytes, &entropy_bytes_read};

// Pixels kept on each side of the window while decoding, so that chroma upsampling at the window's
// edge sees the same neighbours as in a full decode (libjpeg treats a cropped edge as the image edge).
constexpr unsigned MARGIN = 2;

// Adobe's CMYK JPEGs store inverted ink; RGB = (255 - ink) * (255 - black) / 255 with inverted values.
void cmyk_to_rgb(const uint8_t* cmyk, uint8_t* rgb, unsigned pixels) {
    for (unsigned i = 0; i < pixels; ++i, cmyk += 4, rgb += 3) {
        unsigned k = cmyk[3];
        rgb[0] = static_cast<uint8_t>((cmyk[0] * k + 127) / 255);
        rgb[1] = static_cast<uint8_t>((cmyk[1] * k + 127) / 255);
        rgb[2] = static_cast<uint8_t>((cmyk[2] * k + 127) / 255);
    }
}

// Decodes rows [y0, y0 + h) and columns [x0, x0 + w) of the image scaled by 1/denom into d.window
// (packed RGB, h * w * 3). Returns 1 after a region decode, 2 after a full decode (progressive or
// CMYK files, where a region decode saves nothing or is not offered), -1 for a file libjpeg rejects.
// No C++ object with a destructor may live between setjmp and a longjmp: buffers are sized first.
int decode_window(Decompressor& d, const uint8_t* source, uint64_t size, unsigned denom, unsigned x0,
                  unsigned y0, unsigned w, unsigned h, uint64_t* decoded) {
    jpeg_decompress_struct* cinfo = &d.cinfo;
    if (!d.ready) return -1;
    if (setjmp(d.errors.jump)) {
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    jpeg_mem_src(cinfo, source, static_cast<unsigned long>(size));
    jpeg_read_header(cinfo, TRUE);
    const bool cmyk = cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK;
    const bool region = !cmyk;
    cinfo->out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
    cinfo->scale_num = 1;
    cinfo->scale_denom = denom;
    cinfo->dct_method = JDCT_IFAST;   // what FFCV's stock decoder asks TurboJPEG for (TJFLAG_FASTDCT)
    cinfo->do_fancy_upsampling = TRUE;
    jpeg_start_decompress(cinfo);
    if (x0 + w > cinfo->output_width || y0 + h > cinfo->output_height) {
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    const unsigned channels = cinfo->output_components;
    JDIMENSION column = 0, columns = cinfo->output_width;
    unsigned first_row = 0;
    if (region) {
        column = x0 > MARGIN ? x0 - MARGIN : 0;
        columns = std::min<unsigned>(x0 + w + MARGIN, cinfo->output_width) - column;
        jpeg_crop_scanline(cinfo, &column, &columns);   // widens to iMCU boundaries: use what it reports
        first_row = y0 > MARGIN ? y0 - MARGIN : 0;
        if (first_row > 0) jpeg_skip_scanlines(cinfo, first_row);
    }
    if (d.row.size() < static_cast<size_t>(columns) * channels) d.row.resize(static_cast<size_t>(columns) * channels);
    uint8_t* row = d.row.data();
    uint8_t* out = d.window.data();
    const unsigned skip = x0 - column;   // window's first column within a decoded row
    for (unsigned y = first_row; y < y0 + h; ++y) {
        JSAMPROW rows[1] = {row};
        jpeg_read_scanlines(cinfo, rows, 1);
        if (y < y0) continue;
        if (cmyk) {
            cmyk_to_rgb(row + static_cast<size_t>(skip) * 4, out, w);
        } else {
            std::memcpy(out, row + static_cast<size_t>(skip) * 3, static_cast<size_t>(w) * 3);
        }
        out += static_cast<size_t>(w) * 3;
    }
    *decoded = static_cast<uint64_t>(y0 + h - first_row) * columns;
    jpeg_abort_decompress(cinfo);   // rows below the window are never decoded
    return region ? 1 : 2;
}

// ---- Restart intervals: entropy-decode only the intervals a crop needs ----------------------------------
// Baseline JPEG is one Huffman stream: reaching a crop means entropy-decoding every MCU before it. After a
// restart marker (RSTn) the DC predictors reset and the stream is byte-aligned, so a run of intervals is a
// valid scan on its own. When the intervals tile the MCU rows (an interval count that divides a row, or
// whole rows), the intervals covering the crop (plus two pixels of context for chroma upsampling) form a
// smaller JPEG: the original header with the window's dimensions in its frame header, the intervals with
// their markers renumbered from RST0. libjpeg decodes that as usual. Written by hand: libjpeg-turbo offers
// no random access to restart intervals (its crop API still entropy-decodes from the top).

struct Frame {
    unsigned width = 0, height = 0, mcu_w = 0, mcu_h = 0, mcus_per_row = 0, mcu_rows = 0, interval = 0;
    size_t size_at = 0;    // offset of the frame header's height (2 bytes), then width (2 bytes)
    size_t entropy = 0;    // first byte of the scan's entropy-coded data
};

inline unsigned be16(const uint8_t* p) { return (static_cast<unsigned>(p[0]) << 8) | p[1]; }

// The frame and scan headers of a single-scan sequential Huffman JPEG (SOF0/SOF1, one scan holding every
// component); false for anything else (progressive, arithmetic, lossless, several scans, a cut header).
// f.interval stays 0 without a DRI segment.
bool parse_frame(const uint8_t* s, uint64_t size, Frame& f) {
    if (size < 4 || s[0] != 0xFF || s[1] != 0xD8) return false;
    size_t pos = 2;
    unsigned components = 0;
    bool frame = false;
    while (pos + 4 <= size) {
        if (s[pos] != 0xFF) return false;
        const uint8_t marker = s[pos + 1];
        if (marker == 0xFF) { ++pos; continue; }   // fill byte
        if (marker == 0xD8 || marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) { pos += 2; continue; }
        if (marker == 0xD9) return false;
        const size_t length = be16(s + pos + 2);
        if (length < 2 || pos + 2 + length > size) return false;
        const uint8_t* segment = s + pos + 4;   // after the length field
        if (marker == 0xC0 || marker == 0xC1) {
            if (length < 8 || segment[0] != 8) return false;
            f.height = be16(segment + 1);
            f.width = be16(segment + 3);
            components = segment[5];
            if (f.height == 0 || f.width == 0 || components == 0 || length < 8 + 3 * components) return false;
            unsigned hmax = 1, vmax = 1;
            for (unsigned c = 0; c < components; ++c) {
                const unsigned h = segment[6 + 3 * c + 1] >> 4, v = segment[6 + 3 * c + 1] & 15;
                if (h == 0 || v == 0) return false;
                hmax = std::max(hmax, h);
                vmax = std::max(vmax, v);
            }
            // one component: non-interleaved, an MCU is one 8 x 8 block of it
            f.mcu_w = components == 1 ? 8 : 8 * hmax;
            f.mcu_h = components == 1 ? 8 : 8 * vmax;
            f.size_at = pos + 5;
            frame = true;
        } else if ((marker >= 0xC2 && marker <= 0xCB && marker != 0xC4 && marker != 0xC8) ||
                   (marker >= 0xCD && marker <= 0xCF)) {
            return false;   // progressive, lossless, hierarchical or arithmetic-coded
        } else if (marker == 0xDD) {
            if (length != 4) return false;
            f.interval = be16(segment);
        } else if (marker == 0xDA) {   // Ns, a selector pair per component, Ss, Se, AhAl
            if (!frame || length < 6 + 2 * static_cast<size_t>(components) || segment[0] != components) return false;
            f.entropy = pos + 2 + length;
            f.mcus_per_row = (f.width + f.mcu_w - 1) / f.mcu_w;
            f.mcu_rows = (f.height + f.mcu_h - 1) / f.mcu_h;
            return true;
        }
        pos += 2 + length;
    }
    return false;
}

// Where each restart interval's entropy data starts and ends (an end is its marker's first byte). False
// when the markers are not the ones the restart interval promises (a damaged or cut file): the caller
// then decodes the usual way, whose error handling copes with it.
bool find_intervals(const uint8_t* s, uint64_t size, const Frame& f, std::vector<uint32_t>& starts,
                    std::vector<uint32_t>& ends) {
    const uint64_t expected = (static_cast<uint64_t>(f.mcus_per_row) * f.mcu_rows + f.interval - 1) / f.interval;
    starts.assign(1, static_cast<uint32_t>(f.entropy));
    ends.clear();
    const uint8_t* p = s + f.entropy;
    const uint8_t* end = s + size;
    while (true) {
        p = static_cast<const uint8_t*>(std::memchr(p, 0xFF, static_cast<size_t>(end - p)));
        if (p == nullptr || p + 1 >= end) return false;   // no end of scan: cut
        const uint8_t next = p[1];
        if (next == 0x00) { p += 2; continue; }           // a stuffed 0xFF data byte
        if (next == 0xFF) { p += 1; continue; }           // fill before a marker
        ends.push_back(static_cast<uint32_t>(p - s));
        if (next >= 0xD0 && next <= 0xD7) {
            if (next - 0xD0 != static_cast<int>((starts.size() - 1) & 7) || starts.size() >= expected) return false;
            starts.push_back(static_cast<uint32_t>(p + 2 - s));
            p += 2;
            continue;
        }
        return starts.size() == expected;   // EOI (or another marker) ends the scan
    }
}

// A file whose restart intervals the decoder can use: single-scan sequential, with intervals that tile its
// MCU rows (a divisor of a row, or whole rows) and fit 32-bit offsets.
bool usable_restarts(const uint8_t* source, uint64_t size, Frame& f) {
    return size <= UINT32_MAX && parse_frame(source, size, f) && f.interval > 0 &&
           (f.mcus_per_row % f.interval == 0 || f.interval % f.mcus_per_row == 0);
}

struct Restarts {
    std::vector<uint32_t> starts, ends;
    std::vector<uint8_t> stream;   // the window's JPEG
    uint64_t bytes_read = 0, bytes_total = 0;   // entropy-coded bytes in it, and in the whole file
};

thread_local Restarts restarts;

// Builds, in restarts.stream, the JPEG of only the restart intervals that cover the window (as decode_window
// takes it: scaled by 1/denom) plus its margin, and sets *dx, *dy to the window's offset in it.
// False when the file has no restart intervals that tile its rows, or they would skip nothing.
bool window_stream(const uint8_t* source, uint64_t size, unsigned denom, unsigned x0, unsigned y0, unsigned w,
                   unsigned h, unsigned* dx, unsigned* dy) {
    Restarts& r = restarts;
    Frame f;
    if (!usable_restarts(source, size, f)) return false;
    // The window in full-size pixels, widened by decode_window's MARGIN (scaled) on every side: chroma
    // upsampling reads one neighbouring chroma sample, which must come from the file, not from an edge.
    const unsigned pad = MARGIN * denom;
    const unsigned left = x0 * denom, right = (x0 + w) * denom, top = y0 * denom, bottom = (y0 + h) * denom;
    // A window past the file's own frame (the stored size disagrees with the file): the usual path rejects it.
    if (right > f.width || bottom > f.height) return false;
    unsigned c0 = (left > pad ? left - pad : 0) / f.mcu_w, c1 = (right + pad + f.mcu_w - 1) / f.mcu_w;
    unsigned r0 = (top > pad ? top - pad : 0) / f.mcu_h, r1 = (bottom + pad + f.mcu_h - 1) / f.mcu_h;
    c1 = std::min(c1, f.mcus_per_row);
    r1 = std::min(r1, f.mcu_rows);
    const bool in_rows = f.mcus_per_row % f.interval == 0;   // intervals tile each row (else whole rows)
    const unsigned rows_per = in_rows ? 1 : f.interval / f.mcus_per_row;
    if (in_rows) {
        c0 = c0 / f.interval * f.interval;
        c1 = std::min((c1 + f.interval - 1) / f.interval * f.interval, f.mcus_per_row);
    } else {
        c0 = 0;
        c1 = f.mcus_per_row;
        r0 = r0 / rows_per * rows_per;
        r1 = std::min((r1 + rows_per - 1) / rows_per * rows_per, f.mcu_rows);
    }
    if (c0 == 0 && c1 == f.mcus_per_row && r0 == 0) return false;   // only rows below: the usual path stops there
    if (!find_intervals(source, size, f, r.starts, r.ends)) return false;
    const unsigned width = c1 == f.mcus_per_row ? f.width - c0 * f.mcu_w : (c1 - c0) * f.mcu_w;
    const unsigned height = r1 == f.mcu_rows ? f.height - r0 * f.mcu_h : (r1 - r0) * f.mcu_h;
    std::vector<uint8_t>& out = r.stream;
    out.assign(source, source + f.entropy);
    out[f.size_at] = static_cast<uint8_t>(height >> 8);
    out[f.size_at + 1] = static_cast<uint8_t>(height);
    out[f.size_at + 2] = static_cast<uint8_t>(width >> 8);
    out[f.size_at + 3] = static_cast<uint8_t>(width);
    unsigned count = 0;
    uint64_t bytes = 0;
    auto append = [&](unsigned i) {
        if (count > 0) {   // the markers renumbered: RST0, RST1, ... in the new stream's order
            out.push_back(0xFF);
            out.push_back(static_cast<uint8_t>(0xD0 + ((count - 1) & 7)));
        }
        out.insert(out.end(), source + r.starts[i], source + r.ends[i]);
        bytes += r.ends[i] - r.starts[i];
        ++count;
    };
    if (in_rows) {
        const unsigned per_row = f.mcus_per_row / f.interval;
        for (unsigned row = r0; row < r1; ++row)
            for (unsigned i = row * per_row + c0 / f.interval; i < row * per_row + c1 / f.interval; ++i) append(i);
    } else {
        for (unsigned i = r0 / rows_per; i < (r1 + rows_per - 1) / rows_per; ++i) append(i);
    }
    out.push_back(0xFF);
    out.push_back(0xD9);
    r.bytes_read = bytes;
    r.bytes_total = r.ends.back() - r.starts.front();
    *dx = c0 * f.mcu_w / denom;
    *dy = r0 * f.mcu_h / denom;
    return true;
}

// Decodes the window (as decode_window) from only the restart intervals that cover it. Returns 0 when
// window_stream declines (the caller decodes as usual), else decode_window's result on the smaller stream.
int decode_window_restarts(Decompressor& d, const uint8_t* source, uint64_t size, unsigned denom, unsigned x0,
                           unsigned y0, unsigned w, unsigned h, uint64_t* decoded) {
    unsigned dx = 0, dy = 0;
    if (!window_stream(source, size, denom, x0, y0, w, h, &dx, &dy)) return 0;
    Restarts& r = restarts;
    const int kind = decode_window(d, r.stream.data(), r.stream.size(), denom, x0 - dx, y0 - dy, w, h, decoded);
    if (kind > 0) {
        restart_decodes.fetch_add(1, std::memory_order_relaxed);
        entropy_bytes_read.fetch_add(r.bytes_read, std::memory_order_relaxed);
        entropy_bytes.fetch_add(r.bytes_total, std::memory_order_relaxed);
    }
    return kind;
}

// Resize policy: halve by 2x2 (or 2x1) box averaging while the shrink is 2x or more along an axis (OpenCV's
// integer-factor area path: ~6x cheaper than INTER_AREA at a fractional factor), then bilinear for the
// rest, which is under 2x (the box filter, like DCT scaling, already low-passed the image). An odd last
// row or column is dropped before a halving: under one source pixel.
thread_local cv::Mat halved[2];

void resize_into(cv::Mat crop, uint8_t* destination, unsigned out_h, unsigned out_w, int flip) {
    cv::Mat out(static_cast<int>(out_h), static_cast<int>(out_w), CV_8UC3, destination);
    for (int step = 0;; ++step) {
        const int fx = crop.cols >= 2 * out.cols ? 2 : 1, fy = crop.rows >= 2 * out.rows ? 2 : 1;
        if (fx == 1 && fy == 1) break;
        const cv::Mat even = crop(cv::Rect(0, 0, crop.cols / fx * fx, crop.rows / fy * fy));
        cv::Mat& target = halved[step % 2];
        cv::resize(even, target, cv::Size(even.cols / fx, even.rows / fy), 0, 0, cv::INTER_AREA);
        crop = target;
    }
    if (crop.rows == out.rows && crop.cols == out.cols) {
        crop.copyTo(out);
    } else {
        cv::resize(crop, out, out.size(), 0, 0, cv::INTER_LINEAR);
    }
    if (flip) cv::flip(out, out, 1);
}

// A libjpeg destination that writes straight into the caller's buffer (jpeg_mem_dest would malloc, and on an
// error after it grew its buffer the caller could not free the right one). Bytes past the capacity go to a
// scratch block and are only counted: the caller then asks again with more room.
struct FixedDestination {
    jpeg_destination_mgr pub{};
    uint64_t capacity = 0;
    uint64_t spilled = 0;      // bytes that did not fit, in scratch blocks already filled
    bool in_scratch = false;   // the caller's buffer is full (libjpeg asks for room as soon as it fills)
    uint8_t scratch[4096];
    static void init(j_compress_ptr) {}
    static void term(j_compress_ptr) {}
    static boolean empty(j_compress_ptr cinfo) {
        auto* self = reinterpret_cast<FixedDestination*>(cinfo->dest);
        if (self->in_scratch) self->spilled += sizeof self->scratch;
        self->in_scratch = true;
        self->pub.next_output_byte = self->scratch;
        self->pub.free_in_buffer = sizeof self->scratch;
        return TRUE;
    }
    void attach(j_compress_ptr cinfo, uint8_t* buffer, uint64_t room) {
        pub.init_destination = init;
        pub.empty_output_buffer = empty;
        pub.term_destination = term;
        pub.next_output_byte = buffer;
        pub.free_in_buffer = capacity = room;
        cinfo->dest = &pub;
        if (room == 0) empty(cinfo);   // libjpeg writes a byte before it checks for room
    }
    // The bytes written, -1 when they did not all fit.
    int64_t size() const {
        if (!in_scratch) return static_cast<int64_t>(capacity - pub.free_in_buffer);
        return spilled + (sizeof scratch - pub.free_in_buffer) > 0 ? -1 : static_cast<int64_t>(capacity);
    }
};

}  // namespace

extern "C" {

// Largest DCT downscale (1, 2, 4 or 8, at most max_denom) that keeps a crop_h x crop_w crop at least
// out_h x out_w.
unsigned fp_scale_denom(unsigned crop_h, unsigned crop_w, unsigned out_h, unsigned out_w, unsigned max_denom) {
    unsigned denom = 1;
    while (denom * 2 <= max_denom && crop_h >= denom * 2 * out_h && crop_w >= denom * 2 * out_w) denom *= 2;
    return denom;
}

// Decodes the crop (top, left, crop_h, crop_w) of a JPEG stored at height x width, at the largest DCT
// scale that keeps the crop at least out_h x out_w, resizes it into destination (out_h x out_w x 3),
// mirrored when flip. With a DCT scale of 1/d the window is snapped inward to multiples of d (< d px
// on each side), and each 2x halving of the resize drops an odd last row or column: crops move by less
// than an output pixel. Returns d; a negative value when libjpeg rejects the file (destination zeroed).
int fp_decode_crop(const uint8_t* source, uint64_t size, unsigned height, unsigned width, unsigned top,
                   unsigned left, unsigned crop_h, unsigned crop_w, uint8_t* destination, unsigned out_h,
                   unsigned out_w, int flip, unsigned max_denom) {
    if (crop_h == 0 || crop_w == 0 || top + crop_h > height || left + crop_w > width) return -2;
    const unsigned denom = fp_scale_denom(crop_h, crop_w, out_h, out_w, max_denom);
    const unsigned x0 = left / denom, y0 = top / denom, w = crop_w / denom, h = crop_h / denom;
    Decompressor& d = decompressor;
    if (d.window.size() < static_cast<size_t>(w) * h * 3) d.window.resize(static_cast<size_t>(w) * h * 3);
    uint64_t decoded = 0;
    int kind = decode_window_restarts(d, source, size, denom, x0, y0, w, h, &decoded);
    if (kind == 0) kind = decode_window(d, source, size, denom, x0, y0, w, h, &decoded);
    samples.fetch_add(1, std::memory_order_relaxed);
    output_pixels.fetch_add(static_cast<uint64_t>(out_h) * out_w, std::memory_order_relaxed);
    stored_pixels.fetch_add(static_cast<uint64_t>(height) * width, std::memory_order_relaxed);
    if (kind < 0) {
        failures.fetch_add(1, std::memory_order_relaxed);
        std::memset(destination, 0, static_cast<size_t>(out_h) * out_w * 3);
        return kind;
    }
    decoded_pixels.fetch_add(decoded, std::memory_order_relaxed);
    if (kind == 2) full_decodes.fetch_add(1, std::memory_order_relaxed);
    if (denom > 1) scaled_decodes.fetch_add(1, std::memory_order_relaxed);
    const cv::Mat crop(static_cast<int>(h), static_cast<int>(w), CV_8UC3, d.window.data());
    resize_into(crop, destination, out_h, out_w, flip);
    return static_cast<int>(denom);
}

// The same crop + resize for raw (already decoded) pixels.
int fp_crop_resize(const uint8_t* pixels, unsigned height, unsigned width, unsigned top, unsigned left,
                   unsigned crop_h, unsigned crop_w, uint8_t* destination, unsigned out_h, unsigned out_w,
                   int flip) {
    if (crop_h == 0 || crop_w == 0 || top + crop_h > height || left + crop_w > width) return -2;
    const cv::Mat image(static_cast<int>(height), static_cast<int>(width), CV_8UC3, const_cast<uint8_t*>(pixels));
    resize_into(image(cv::Rect(static_cast<int>(left), static_cast<int>(top), static_cast<int>(crop_w),
                               static_cast<int>(crop_h))),
                destination, out_h, out_w, flip);
    samples.fetch_add(1, std::memory_order_relaxed);
    output_pixels.fetch_add(static_cast<uint64_t>(out_h) * out_w, std::memory_order_relaxed);
    stored_pixels.fetch_add(static_cast<uint64_t>(height) * width, std::memory_order_relaxed);
    return 1;
}

// Counters: samples, decoded pixels, stored pixels, output pixels, full decodes, scaled decodes, failures,
// decodes from restart intervals, their entropy-coded bytes in all and the bytes of them decoded.
void fp_read_counters(uint64_t* out) {
    for (auto* counter : counters) *out++ = counter->load();
}

void fp_reset_counters() {
    for (auto* counter : counters) counter->store(0);
}

// For benchmarks: entropy-decodes (Huffman only: no inverse DCT, upsampling or colour conversion) what
// fp_decode_crop would for this crop: the covering restart intervals when the file has usable ones, else
// the whole file. Returns 1 after intervals, 2 after the whole file, -1 when libjpeg rejects it.
int fp_entropy_only(const uint8_t* source, uint64_t size, unsigned height, unsigned width, unsigned top,
                    unsigned left, unsigned crop_h, unsigned crop_w, unsigned out_h, unsigned out_w,
                    unsigned max_denom) {
    if (crop_h == 0 || crop_w == 0 || top + crop_h > height || left + crop_w > width) return -2;
    const unsigned denom = fp_scale_denom(crop_h, crop_w, out_h, out_w, max_denom);
    unsigned dx = 0, dy = 0;
    const bool part = window_stream(source, size, denom, left / denom, top / denom, crop_w / denom,
                                    crop_h / denom, &dx, &dy);
    const uint8_t* data = part ? restarts.stream.data() : source;
    const uint64_t length = part ? restarts.stream.size() : size;
    jpeg_decompress_struct* cinfo = &decompressor.cinfo;
    if (!decompressor.ready) return -1;
    if (setjmp(decompressor.errors.jump)) {
        jpeg_abort_decompress(cinfo);
        return -1;
    }
    jpeg_mem_src(cinfo, data, static_cast<unsigned long>(length));
    jpeg_read_header(cinfo, TRUE);
    jpeg_read_coefficients(cinfo);
    jpeg_abort_decompress(cinfo);
    return part ? 1 : 2;
}

// For benchmarks: finds the restart intervals as window_stream does (the frame header, then every marker
// of the entropy-coded data); returns their count, 0 when the file has none it can use.
unsigned fp_scan_intervals(const uint8_t* source, uint64_t size) {
    Frame f;
    if (!usable_restarts(source, size, f)) return 0;
    return find_intervals(source, size, f, restarts.starts, restarts.ends) ? restarts.starts.size() : 0;
}

// MCUs per row of a single-scan sequential JPEG (0 for any other file: it keeps its form).
unsigned fp_mcus_per_row(const uint8_t* source, uint64_t size) {
    Frame f;
    return parse_frame(source, size, f) ? f.mcus_per_row : 0;
}

// Lossless rewrite of a JPEG with a restart marker every `interval` MCUs (jpegtran's -restart): the DCT
// coefficients are copied, not decoded to pixels, so every decoder gives the same pixels as before. Writes
// into destination (capacity bytes); returns the new size, 0 when it does not fit, -1 for a file libjpeg rejects.
int64_t fp_add_restarts(const uint8_t* source, uint64_t size, unsigned interval, uint8_t* destination,
                        uint64_t capacity) {
    jpeg_decompress_struct in{};   // zeroed: destroying one that was never created is a no-op
    jpeg_compress_struct out{};
    ErrorManager errors;
    FixedDestination written;
    in.err = out.err = quiet_errors(errors);
    if (setjmp(errors.jump)) {
        jpeg_destroy_compress(&out);
        jpeg_destroy_decompress(&in);
        return -1;
    }
    jpeg_create_decompress(&in);
    jpeg_create_compress(&out);
    jpeg_mem_src(&in, source, static_cast<unsigned long>(size));
    // Beton JPEGs are FFCV's own encodes of decoded pixels (EXIF already applied): no marker worth copying.
    jpeg_read_header(&in, TRUE);
    jvirt_barray_ptr* coefficients = jpeg_read_coefficients(&in);
    jpeg_copy_critical_parameters(&in, &out);
    out.restart_interval = interval;
    // Huffman tables fitted to the file (a second pass over the coefficients, as jpegtran -optimize): what
    // the markers add is won back, and the coefficients, hence the pixels, are unchanged.
    out.optimize_coding = TRUE;
    written.attach(&out, destination, capacity);
    jpeg_write_coefficients(&out, coefficients);
    jpeg_finish_compress(&out);
    jpeg_finish_decompress(&in);
    const int64_t result = std::max<int64_t>(written.size(), 0);
    jpeg_destroy_compress(&out);
    jpeg_destroy_decompress(&in);
    return result;
}

}  // extern "C"

// Importable as a module too, so that packaging tools treat it as one; the functions above go through ctypes.
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cropdecode", "crop-region JPEG decoding (ctypes)", -1};
PyMODINIT_FUNC PyInit__cropdecode(void) { return PyModule_Create(&module); }
