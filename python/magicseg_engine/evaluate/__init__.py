"""Zero-shot evaluation of a pretrained model: benchmark readers, sliding-window inference, metrics."""
