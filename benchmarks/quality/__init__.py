"""Quality experiments on the small-image sets (synthetic, hard, digits, Fashion-MNIST): `sets` makes and
converts them, `recipes` trains the recipes (`python -m benchmarks quality`), `lr_sweep` checks lr=auto
against fixed LRs (`python -m benchmarks lr-sweep`)."""
