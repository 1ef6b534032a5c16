"""promptseg's quick-try web page (``promptseg app``): upload an image, type prompts, see the masks.

Needs the ``app`` extra (``pip install "promptseg[app]"``, which brings Gradio). Gradio is imported
only when the page is built (`promptseg_app.page`), never when the command line is, so
``promptseg --help`` stays fast and works without it. The page serves on 127.0.0.1 by default.

    promptseg app                      # http://127.0.0.1:7860
    promptseg app --clip ViT-B-32/laion2b_s34b_b79k --port 8000
"""
