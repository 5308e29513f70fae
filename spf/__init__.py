"""Safety-preserving fine-tuning (SPF)."""
