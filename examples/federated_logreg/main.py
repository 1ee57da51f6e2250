"""The container's entry point: one training task (init, fit or evaluate) per run."""

from logreg import NoduleClassifier

from tributary_algorithm.training import run_training

if __name__ == "__main__":
    run_training(NoduleClassifier())
