"""The text model: Llama 3 decoder, tokenizer, chat format, generation, export."""
