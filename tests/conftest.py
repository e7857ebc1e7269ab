"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# The one place a machine declares which sandbox isolation layers it cannot provide (comma-separated,
# e.g. "landlock,seccomp" on a kernel without them). A test that needs a layer missing here FAILS
# with the reason unless the layer is declared; declared layers skip, and say so.
SANDBOX_UNAVAILABLE_ENV = "RR_SANDBOX_UNAVAILABLE_LAYERS"


@pytest.fixture(scope="session")
def sandbox_layers() -> frozenset[str]:
    """The isolation layers the sandbox reports in force on this machine."""
    from rr.tasks.sandbox import run_in_sandbox

    result = run_in_sandbox("x = 1", "assert x == 1")
    assert result.passed, result
    return frozenset(result.layers)


@pytest.fixture(scope="session")
def require_sandbox_layers(sandbox_layers):
    """require_sandbox_layers("seccomp", ...): fail (or skip, if declared unable) when a layer is missing."""
    declared = {name.strip() for name in os.environ.get(SANDBOX_UNAVAILABLE_ENV, "").split(",") if name.strip()}

    def require(*names: str) -> None:
        missing = [name for name in names if name not in sandbox_layers]
        undeclared = [name for name in missing if name not in declared]
        if undeclared:
            pytest.fail(f"sandbox layer(s) {', '.join(undeclared)} not in force on this machine (in force: "
                        f"{', '.join(sorted(sandbox_layers)) or 'none'}); fix the kernel/privileges or declare "
                        f"the machine unable with {SANDBOX_UNAVAILABLE_ENV}={','.join(undeclared)}")
        if missing:
            pytest.skip(f"declared unavailable in {SANDBOX_UNAVAILABLE_ENV}: {', '.join(missing)}")

    return require


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; more only contend on a shared 2-core machine. Modules of tiny-model
    tests use it for every test (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def learned_state():
    """tiny_model()'s weights fitted to support.FORGET and RETAIN, so there is something to unlearn."""
    from rr.core.tokens import collate, encode_examples
    from rr.methods.losses import nll_loss
    from rr.release.pem import response_loss
    from support import FORGET, RETAIN, char_tokenizer, learned_model, tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures start before `one_thread`; the fit depends on the thread count
    torch.manual_seed(0)
    tokenizer, model = char_tokenizer(), tiny_model()
    batch = collate(encode_examples(tokenizer, FORGET + RETAIN, 64), tokenizer.pad_token_id)
    model.requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        nll_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                 batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    torch.set_num_threads(threads)
    check = learned_model(state)
    assert response_loss(check, tokenizer, FORGET) < 0.3 and response_loss(check, tokenizer, RETAIN) < 0.1
    return state
