"""distq: distributed training of quantized networks. Weights: distq.optim and distq.quant;
gradients on the wire: distq.comm. `import distq` imports nothing itself (distq.theory stays free
of torch); each subpackage imports what it needs."""
