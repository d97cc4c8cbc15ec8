"""Scripts that retrain a shipped weight (or write demo data) from scratch: `python -m retrain.<script>` from the
repository root. They use the packages (`diffenv`, `rewards`) and are never imported by them, so the runtime
packages carry no training code and `rewards` never imports `diffenv`.

| script | writes |
|---|---|
| `train_digits` | the embedded digits models, `diffenv/models/weights/digits-*` |
| `train_shapes` | the embedded `shapes` StableDiffusionPipeline, `diffenv/models/weights/shapes/` |
| `train_classifiers` | `digit_classifier` and `digit_judge`, `rewards/weights/` |
| `train_independent_judge` | `digit_judge_indep`, `rewards/weights/` |
| `train_shapes_rewards` | `shapes_verifier` and `shapes_judge`, `rewards/weights/` |
| `ratings_demo` | a synthetic human-ratings CSV and the `ratings` head fitted to it (the ratings walkthrough) |
"""
