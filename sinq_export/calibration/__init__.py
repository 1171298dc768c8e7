"""Everything that runs the float model: the calibration and probe windows, the block-by-block
forwards that collect input statistics, the energy probe, and the bit allocation's
sensitivities. Below it, `quant` only sees tensors and statistics."""
