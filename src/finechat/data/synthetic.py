"""ADGEN-like synthetic data: clothing attribute strings -> Chinese advertising copy, deterministic by seed.

Written for this project (no copied data). Each record is ``{"content": "类型#上衣*颜色#白色*...", "summary":
"..."}`` as in AdvertiseGen, the data set of ChatGLM-6B's ptuning example. Every attribute value in the
prompt appears in the copy, through one of several phrasings, in varied order, with varied openings and
closings, so a model must learn the attribute -> phrase mapping rather than memorise one text.
"""

from __future__ import annotations

import random
from pathlib import Path

from finechat.files import write_jsonl_atomic

# Garment type -> the attribute keys it can carry (besides 类型).
GARMENTS: dict[str, list[str]] = {
    "上衣": ["颜色", "风格", "图案", "材质", "衣样式", "衣领型", "袖长", "袖型"],
    "裙": ["颜色", "风格", "图案", "材质", "裙型", "裙长", "裙领型", "裙袖长"],
    "裤": ["颜色", "风格", "图案", "材质", "裤型", "裤长", "裤腰型"],
}

VALUES: dict[str, list[str]] = {
    "颜色": ["白色", "黑色", "红色", "蓝色", "粉色", "卡其色", "灰色", "绿色", "杏色", "酒红色"],
    "风格": ["简约", "复古", "文艺", "街头", "休闲", "通勤", "甜美", "性感", "清新", "韩版"],
    "图案": ["刺绣", "条纹", "格子", "印花", "碎花", "字母", "纯色", "波点", "线条"],
    "材质": ["棉", "牛仔布", "针织", "雪纺", "蕾丝", "羊毛", "真丝", "网纱", "亚麻"],
    "衣样式": ["外套", "衬衫", "卫衣", "毛衣", "T恤", "西装", "风衣", "马甲"],
    "衣领型": ["圆领", "v领", "翻领", "立领", "连帽", "高领", "娃娃领"],
    "袖长": ["长袖", "短袖", "七分袖", "无袖"],
    "袖型": ["泡泡袖", "灯笼袖", "喇叭袖", "落肩袖", "蝙蝠袖"],
    "裙型": ["a字", "百褶", "包臀", "鱼尾", "直筒", "蛋糕"],
    "裙长": ["短裙", "中长裙", "长裙", "超短裙"],
    "裙领型": ["v领", "圆领", "一字领", "方领"],
    "裙袖长": ["短袖", "长袖", "无袖"],
    "裤型": ["阔腿裤", "直筒裤", "哈伦裤", "灯笼裤", "铅笔裤", "工装裤"],
    "裤长": ["九分裤", "七分裤", "长裤", "短裤"],
    "裤腰型": ["高腰", "松紧腰", "中腰"],
}

# Phrasings per attribute key; {v} is the value, {g} the garment word.
PHRASES: dict[str, list[str]] = {
    "颜色": ["{v}的配色干净耐看", "选用{v}作为主色调，低调又显气质", "{v}的色调很衬肤色", "一抹{v}，让整体更加出彩"],
    "风格": ["整体是{v}风格", "带着浓浓的{v}气息", "{v}的设计风格，日常穿搭毫不费力", "演绎出{v}的味道"],
    "图案": ["点缀着精致的{v}图案", "{v}元素的运用增添了细节感", "{v}的装饰让{g}更有看点", "以{v}作为亮点"],
    "材质": ["采用{v}面料，穿着舒适", "{v}材质亲肤透气", "精选{v}，手感柔软", "{v}的质地很有垂感"],
    "衣样式": ["这款{v}", "这件{v}版型利落", "{v}的款式百搭实穿", "一件好穿的{v}"],
    "衣领型": ["{v}设计修饰脸型", "{v}的领口显得精神", "经典的{v}，更显脖颈线条"],
    "袖长": ["{v}的长度刚刚好", "{v}设计方便活动", "{v}款式适合当季穿着"],
    "袖型": ["{v}的袖型很有特色", "别致的{v}增添灵动感", "{v}设计巧妙遮肉"],
    "裙型": ["{v}的裙摆优雅大方", "{v}版型修饰身材比例", "经典{v}轮廓，走动间很灵动"],
    "裙长": ["{v}的长度很友好", "{v}款式显高显瘦", "{v}设计，行走间摇曳生姿"],
    "裙领型": ["{v}设计露出锁骨", "{v}领口温柔又精致", "{v}的剪裁更显气质"],
    "裙袖长": ["搭配{v}，清爽利落", "{v}的设计适合多个季节", "{v}款式方便搭配外套"],
    "裤型": ["{v}的版型拉长腿部线条", "这条{v}穿着不挑身材", "{v}的廓形轻松有型"],
    "裤长": ["{v}的长度露出脚踝更显高", "{v}设计，搭配球鞋很好看", "{v}长度，四季都能穿"],
    "裤腰型": ["{v}设计提升腰线", "{v}穿着舒适不勒", "{v}的剪裁更显比例"],
}
OPENINGS = ["", "", "这款{g}很值得入手，", "今年很流行的{g}，", "一件让人心动的{g}，", "衣橱里少不了这样的{g}，"]
CLOSINGS = ["。", "，轻松穿出好气质。", "，让你成为人群中的焦点。", "，日常通勤或约会都很合适。", "，穿出自信与美丽。"]


def adgen_record(rng: random.Random) -> dict[str, str]:
    """One ADGEN-like record: an attribute string and a copy that mentions every attribute value."""
    garment = rng.choice(list(GARMENTS))
    keys = rng.sample(GARMENTS[garment], k=rng.randint(2, min(5, len(GARMENTS[garment]))))
    attrs = [("类型", garment)] + [(k, rng.choice(VALUES[k])) for k in keys]
    content = "*".join(f"{k}#{v}" for k, v in attrs)
    parts = [rng.choice(PHRASES[k]).format(v=v, g=garment) for k, v in attrs[1:]]
    rng.shuffle(parts)
    summary = rng.choice(OPENINGS).format(g=garment) + "，".join(parts) + rng.choice(CLOSINGS)
    return {"content": content, "summary": summary}


def generate_adgen(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` ADGEN-like records; the same seed gives the same records."""
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    return [adgen_record(rng) for _ in range(n)]


def write_adgen(path: str | Path, n: int, seed: int = 0) -> int:
    """Write ``n`` records as JSONL (AdvertiseGen's own layout: one object per line)."""
    return write_jsonl_atomic(path, generate_adgen(n, seed))
