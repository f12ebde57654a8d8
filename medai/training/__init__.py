"""Training: the loop, mixed precision, callbacks and run folders."""
