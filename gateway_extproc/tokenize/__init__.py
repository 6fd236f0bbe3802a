"""A request's prompt as the engine sees it: rendered with the model's chat template and
tokenized with its Hugging Face tokenizer (`chat_template`, `tokenizer`, `catalog`)."""
