"""IWSLT'14 German-English translation task (ASAM Table 5): data preparation, model, beam search."""
