"""`xpsr serve`: a web app over the inference pipeline (engine.py: the work; app.py: the Gradio page)."""
