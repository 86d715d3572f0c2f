"""The publish stage: versioned releases, the promotion gate, the model card, the timm folder."""
