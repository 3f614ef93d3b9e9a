"""Training data: read and validate a file, tokenize with the model's chat template, batch.

    examples = read_examples("train.jsonl")                 # every bad line reported at once
    tokenized = tokenize_examples(examples, tokenizer, max_length=512)
    for indices in batch_indices(tokenized.lengths, 8, seed=0, epoch=0):
        batch = collate([tokenized.rows[i] for i in indices], pad_id=tokenizer.pad_token_id)
"""

from feathertune.data.batching import batch_indices, collate
from feathertune.data.formats import Example, Examples, read_examples
from feathertune.data.tokenize import Tokenized, tokenize_examples

__all__ = ["Example", "Examples", "Tokenized", "batch_indices", "collate", "read_examples", "tokenize_examples"]
