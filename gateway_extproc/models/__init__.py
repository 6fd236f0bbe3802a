"""The model dictionary: which models exist, which pods serve them, and in what state."""
