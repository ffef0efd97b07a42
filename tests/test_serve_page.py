"""The web chat page in a real headless Chromium: streaming, stop, new chat, Markdown, no script injection."""

import os
import shutil
import tempfile

import pytest
from serve_helpers import LiveServer, ScriptedChat, wait_until

from finechat.serve.api import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ANSWER = (
    "Here is **bold** and `code`.\n\n"
    "```python\nprint('hi <b>')\n```\n\n"
    "- one\n- two\n\n"
    '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    "[link](javascript:alert(1)) done."
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (install Debian's chromium)"),
]


@pytest.fixture()
def page_and_bot(tiny_bot):
    from playwright.sync_api import sync_playwright

    bot = ScriptedChat(tiny_bot.tokenizer, ANSWER, delay=0.01)
    srv = LiveServer(create_app(bot))
    profile = tempfile.mkdtemp(prefix="finechat-chromium-")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = context.new_page()
            page.goto(srv.url + "/")
            yield page, bot, srv
        finally:
            context.close()
            srv.stop()
            shutil.rmtree(profile, ignore_errors=True)


def send(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def test_page_streams_stops_and_clears(page_and_bot):
    page, bot, _ = page_and_bot
    assert page.title() == "finechat"
    send(page, "first message")
    # tokens appear while the answer is still streaming
    page.wait_for_function("() => { const m = document.querySelector('.msg.assistant.streaming');"
                           " return m && m.querySelector('.body').textContent.length > 5; }", timeout=20000)
    page.wait_for_function("() => !document.querySelector('#send').disabled", timeout=30000)
    answer = page.locator(".msg.assistant").first
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("pre code").inner_text() == "print('hi <b>')"
    assert answer.locator("pre button.copy").count() == 1 and answer.locator("li").count() == 2
    # the model's HTML is shown as text, never run or parsed
    assert "<img src=x" in answer.inner_text() and answer.locator("img, script, b").count() == 0
    assert answer.locator("a").count() == 0
    assert page.evaluate("window.__pwned") is None

    bot.delay = 0.1  # slow enough to stop mid-answer
    send(page, "second message")
    page.wait_for_function("() => { const m = document.querySelectorAll('.msg.assistant')[1];"
                           " return m && m.querySelector('.body').textContent.length > 0; }", timeout=20000)
    page.click("#stop")
    page.wait_for_selector(".msg.assistant .stopped", timeout=10000)
    assert wait_until(lambda: bot.running == 0, timeout=5)  # stopping in the page stops generation
    second = page.locator(".msg.assistant").nth(1).locator(".body").inner_text()
    assert 0 < len(second) < len("Here is bold and code.")
    # the second request carried the first exchange (multi-turn)
    prompt = bot.tokenizer.decode(bot.prompts[-1])
    assert "first message" in prompt and "print('hi <b>')" in prompt and "second message" in prompt

    page.screenshot(path=os.path.join(tempfile.gettempdir(), "finechat-page.png"))
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    bot.delay = 0.0
    send(page, "fresh start")
    page.wait_for_function("() => !document.querySelector('#send').disabled && "
                           "document.querySelectorAll('.msg.assistant').length === 1", timeout=20000)
    assert "first message" not in bot.tokenizer.decode(bot.prompts[-1])
