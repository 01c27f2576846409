"""The asset factory: rebuilds the embedded world's shipped weights (tokenizer, VAE, CLIP preference
model, text encoder + UNet, VAE decoder refinement, and the shortcut through `shortft distill`) and
measures their quality. `shortft world pretrain|eval` runs it; nothing in the product imports it."""
