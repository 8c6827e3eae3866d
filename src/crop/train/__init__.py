"""Training recipes for real models: the localizer VLM and PLC fine-tuning."""
