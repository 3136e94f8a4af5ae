"""Vision and training-time pruning (issue 6): masks, criteria, allocation, schedules, channel pruning."""
