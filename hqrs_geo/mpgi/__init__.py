"""MpGI captioning pipeline (rule-guided relay): tile facts, rule sentences, prompts and back ends."""
