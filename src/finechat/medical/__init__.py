"""The medical domain recipe (ChatDoctor-style): knowledge graph -> QA, retrieval over a disease table, evaluation."""
