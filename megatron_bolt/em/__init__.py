"""The BoLT EM driver (method.md): warm start, then E-step / merge / train / evaluate per iteration."""
