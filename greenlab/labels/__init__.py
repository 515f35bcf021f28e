"""Report -> label distillation: radiology reports become present (1) / absent (0) / uncertain (-1) /
not mentioned (blank) labels per finding, by rules (CheXpert-labeller style) or an LLM."""
