"""The method: SIGReg (and its Triton kernels), the loss, multi-crop views, the encoder, the minimal loop."""
