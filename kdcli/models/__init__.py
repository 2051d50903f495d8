"""Models in and out: checkpoints and timm folders, conversion of pickle checkpoints, taps, inspection."""
