"""RL objectives as data, losses, the phase schedule, scoring in either space, the train step."""
