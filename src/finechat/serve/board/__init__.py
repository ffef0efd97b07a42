"""finechat board: train, evaluate, chat and export from the browser (``finechat board``).

Why this web stack: the board is the project's own FastAPI app with a static HTML/JS/CSS page, not Gradio
(LlamaBoard's and ms-swift's choice). The board starts processes and reads files, so it must carry the same
security model as ``finechat serve`` (127.0.0.1 by default, the API key, the Host / Origin / content-type
guards on every route, a Content-Security-Policy that loads nothing from elsewhere); it must run offline with
no CDN; and it must install with the README's set-up command without a second UI framework (Gradio brings
its own front-end bundle and dependencies, and its queue would be a second job runner beside ours). The page
stays thin: the Train form is generated from :class:`~finechat.train.train_config.TrainConfig`'s fields and
help, checked by the config's own code, and every run, evaluation and export is a ``finechat`` child process.

Modules: :mod:`.app` (routes), :mod:`.workspace` (paths confined to the workspace, uploads), :mod:`.forms`
(the form from the config), :mod:`.jobs` and :mod:`.runner` (the queue of child processes, state on disk),
:mod:`.data_view` (the Data tab), :mod:`.chat_server` (a ``finechat serve`` child behind ``/chat/``).
"""
