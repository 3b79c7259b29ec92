"""Local speech and noise synthesis for the embedded press_synth corpus."""
