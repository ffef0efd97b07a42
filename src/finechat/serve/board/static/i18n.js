// Interface text of the board in English and Chinese (the config's own help texts stay as the config says them).
"use strict";

const TEXT = {
  en: {
    tab_data: "Data", tab_train: "Train", tab_eval: "Evaluate", tab_chat: "Chat", tab_export: "Export",
    language: "Language", api_key: "API key", upload_legend: "Upload a data file into the workspace",
    upload: "Upload", inspect_legend: "Inspect a file", file: "File", model: "Model (tokenizer)", format: "Format",
    dataset: "Data set (licence)", analyse: "Analyse", recipe_legend: "Start from a recipe", load: "Load",
    preview: "Preview YAML and command", estimate: "Memory estimate", start: "Start (queue)", yaml: "YAML",
    command: "Command (run in the workspace)", copy: "Copy", eval_legend: "BLEU / Rouge on a data file, or lm-eval tasks",
    name: "Name", with_base: "base model beside the adapters", max_samples: "Examples", max_new_tokens: "Answer tokens",
    tasks: "lm-eval tasks (instead of the file)", limit: "Task limit", chat_legend: "Chat with a checkpoint",
    checkpoint: "Checkpoint", tools: "Tools", knowledge: "Medical knowledge (CSV / JSON)", medical: "medical demo",
    unload: "Unload", export_legend: "Merged folder, quantized folder or GGUF + Modelfile", export_to: "Write",
    merged: "merged folder", quantized: "quantized folder (8-bit)", outtype: "GGUF type", jobs: "Runs and jobs",
    job: "Job", kind: "Kind", state: "State", progress: "Progress", stop: "Stop", resume: "Resume", log: "Log",
    more: "More settings", open: "Open", counts: "Counts", bad_records: "Bad records", lengths: "Token lengths",
    examples: "Rendered examples (trained spans marked)", licence: "Licence", commercial: "Commercial use of the result",
    base_only: "base model only", uploaded: "Uploaded", started: "Queued", eta: "ETA", step: "step",
    result: "Result", size: "size", loading: "loading the model…", ready: "ready", off: "no model loaded",
    failed: "failed", train_loss: "train loss", eval_loss: "eval loss", line: "line", field: "field", reason: "reason",
    checkpoints: "Checkpoints", none: "none", load_settings: "Load its settings into the form",
    commercial_use: "commercial use", base_model: "Base model", no_dataset: "not named: the verdict covers the model only", verdict_yes: "yes", verdict_no: "no", verdict_unknown: "unknown",
  },
  zh: {
    tab_data: "数据", tab_train: "训练", tab_eval: "评估", tab_chat: "对话", tab_export: "导出",
    language: "语言", api_key: "API 密钥", upload_legend: "上传数据文件到工作区", upload: "上传",
    inspect_legend: "查看文件", file: "文件", model: "模型（分词器）", format: "格式", dataset: "数据集（许可证）",
    analyse: "分析", recipe_legend: "从配方开始", load: "加载", preview: "预览 YAML 和命令", estimate: "显存估计",
    start: "开始（排队）", yaml: "YAML", command: "命令（在工作区运行）", copy: "复制",
    eval_legend: "在数据文件上计算 BLEU / Rouge，或 lm-eval 任务", name: "名称", with_base: "同时评估基础模型",
    max_samples: "样本数", max_new_tokens: "回答长度", tasks: "lm-eval 任务（代替文件）", limit: "任务样本上限",
    chat_legend: "与检查点对话", checkpoint: "检查点", tools: "工具", knowledge: "医学知识（CSV / JSON）",
    medical: "医疗演示", unload: "卸载", export_legend: "合并模型、量化模型或 GGUF + Modelfile", export_to: "导出为",
    merged: "合并后的文件夹", quantized: "量化文件夹（8 位）", outtype: "GGUF 类型", jobs: "训练与任务", job: "任务",
    kind: "类型", state: "状态", progress: "进度", stop: "停止", resume: "继续", log: "日志", more: "更多设置",
    open: "打开", counts: "数量", bad_records: "错误记录", lengths: "词元长度", examples: "渲染样例（训练部分已标出）",
    licence: "许可证", commercial: "结果可否商用", base_only: "仅基础模型", uploaded: "已上传", started: "已排队",
    eta: "剩余时间", step: "步", result: "结果", size: "大小", loading: "正在加载模型…", ready: "就绪",
    off: "未加载模型", failed: "失败", train_loss: "训练损失", eval_loss: "验证损失", line: "行", field: "字段",
    reason: "原因", checkpoints: "检查点", none: "无", load_settings: "将其设置载入表单",
    commercial_use: "商用", base_model: "基础模型", no_dataset: "未指定：结论只涵盖模型", verdict_yes: "可以", verdict_no: "不可以", verdict_unknown: "未知",
  },
};

function lang() {
  return localStorage.getItem("finechat.board.lang") || (navigator.language.startsWith("zh") ? "zh" : "en");
}

function t(key) {
  return (TEXT[lang()] || TEXT.en)[key] || TEXT.en[key] || key;
}

function applyLanguage() {
  document.documentElement.lang = lang();
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
}
