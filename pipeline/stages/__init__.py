"""Stage backends, one module per stage; `base.get_backend` imports a stage's module on demand
(so running the offline preset never imports the full backends' heavy dependencies)."""
