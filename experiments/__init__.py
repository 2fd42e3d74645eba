"""What drives both stages: the Table 6 comparison, the demo, the figures, the receptive-field tool, the shapes data."""
