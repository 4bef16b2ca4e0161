"""The recipe that builds qktrace's embedded demo: synthetic corpus, tokenizer, model and SAE training,
dashboards. It lives beside the package, not in it; the wheel ships only the assets it wrote and the
case-study runner (`qktrace.demo.run`). `make train-demo` runs it from the repository root:

    python -m recipes.demo.train --out src/qktrace/demo/assets/model
    python -m recipes.demo.train_saes
    python -m recipes.demo.dashboards
"""
