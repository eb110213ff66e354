"""ncd: discover and classify new kinds of industrial defects. One package per pipeline stage
(data, detect, preprocess, train, infer, evaluate); ``pipeline.py`` runs them in order."""
