"""The GPU box, offline: `wheelhouse` builds every wheel it lacks, `sim` proves the README's install on a
stand-in box with the network off."""
