"""The studio: logic (no gradio), the Gradio layout, method colours."""
