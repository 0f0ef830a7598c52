"""Training: the step (loss) and the accelerate loop."""
