"""What the two model stages share about images (PIL and transformers; never imported by the gateway)."""
