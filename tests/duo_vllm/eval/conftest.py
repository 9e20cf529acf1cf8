import pytest


@pytest.fixture(scope="session")
def builder(smollm2_tokenizer):
    from duo_vllm.eval.prompts import PromptBuilder

    return PromptBuilder(smollm2_tokenizer)
