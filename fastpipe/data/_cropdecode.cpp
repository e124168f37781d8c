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

struct Decompressor {
    jpeg_decompress_struct cinfo;
    ErrorManager errors;
    std::vector<uint8_t> row;      // one decoded row of the (column-cropped) output
    std::vector<uint8_t> window;   // the decoded window, packed RGB
    Decompressor() {
        cinfo.err = jpeg_std_error(&errors.pub);
        errors.pub.error_exit = on_error;
        errors.pub.emit_message = on_message;
        errors.pub.output_message = on_output;
        jpeg_create_decompress(&cinfo);
    }
    ~Decompressor() { jpeg_destroy_decompress(&cinfo); }
};

thread_local Decompressor decompressor;

// Work counters for the benchmark reports, summed over all threads.
std::atomic<uint64_t> samples{0}, decoded_pixels{0}, stored_pixels{0}, output_pixels{0}, full_decodes{0},
    scaled_decodes{0}, failures{0};

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
    const int kind = decode_window(d, source, size, denom, x0, y0, w, h, &decoded);
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

// Counters: samples, decoded pixels, stored pixels, output pixels, full decodes, scaled decodes, failures.
void fp_read_counters(uint64_t* out) {
    const std::atomic<uint64_t>* all[] = {&samples, &decoded_pixels, &stored_pixels, &output_pixels,
                                          &full_decodes, &scaled_decodes, &failures};
    for (int i = 0; i < 7; ++i) out[i] = all[i]->load();
}

void fp_reset_counters() {
    for (auto* counter : {&samples, &decoded_pixels, &stored_pixels, &output_pixels, &full_decodes,
                          &scaled_decodes, &failures})
        counter->store(0);
}

}  // extern "C"

// Importable as a module too, so that packaging tools treat it as one; the functions above go through ctypes.
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cropdecode", "crop-region JPEG decoding (ctypes)", -1};
PyMODINIT_FUNC PyInit__cropdecode(void) { return PyModule_Create(&module); }
