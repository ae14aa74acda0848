"""The three training nodes: train_function_calling, train_extractor (sft.py) and train_classifier
(classifier.py). Shared helpers live in common.py. Heavy libraries are imported inside functions so
importing this package (the DAG plan, ``dagtune status``) never loads torch."""
