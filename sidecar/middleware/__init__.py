"""The request pipeline, one middleware per module; ``sidecar.app`` assembles them in order."""
