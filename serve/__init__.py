"""The torch-free runtime (``rnnlm.serve``): numpy and onnxruntime only.

    from rnnlm.serve import LanguageModel
    lm = LanguageModel.load("models/rhn")          # a bundle, or a model dir holding one
    lm.score("the stock market fell")             # ScoreResult(tokens=5, oov=0, nll=..., ppl=...)
    lm.token_logprobs("the stock market fell")    # [("the", -3.1, False), ..., ("<eos>", -1.2, False)]
    lm.generate("the stock market", max_new_tokens=20, temperature=0.8, seed=7)
    r, ctx = lm.score_context(lm.context(), "the stock ")   # a text in pieces: a Context carries it
    lm.export_context(ctx); lm.import_context(...); ctx.fork()
"""

from rnnlm.serve.bundle import Bundle, BundleError
from rnnlm.serve.runtime import Context, LanguageModel, ScoreResult, State, StateError

from rnnlm.text import TextError, Tokenizer

__all__ = ["Bundle", "BundleError", "Context", "LanguageModel", "ScoreResult", "State", "StateError", "TextError",
           "Tokenizer"]
