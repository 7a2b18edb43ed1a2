//! HTML pages (scraper; html5ever parses them as browsers do): the text of the page's `<main>`
//! (each one; the whole page when there is none) as headings (`<h1>`–`<h6>`) and paragraphs (block
//! elements; a list's item a line, a table row a line with cells joined by ` | `, `<br>` a line
//! break, `<pre>` as written) without navigation and boilerplate: `<head>`, `<nav>`, `<aside>`,
//! `<footer>`, `<header>` (except inside `<article>` or `<main>`, where it holds the title),
//! `<script>`, `<style>`, `<noscript>`, `<template>`, `<form>`, `<iframe>`, `<svg>`, elements with
//! the ARIA role navigation, banner, contentinfo, complementary or search, and hidden elements.

use scraper::{ElementRef, Html, Node, Selector};

use super::{push_block, push_collapsed, Block};

/// Elements that are never text of the page.
const BOILERPLATE: &[&str] = &[
    "head", "nav", "aside", "footer", "script", "style", "noscript", "template", "form", "iframe",
    "svg",
];

/// ARIA roles of navigation and page furniture.
const BOILERPLATE_ROLES: &[&str] = &[
    "navigation",
    "banner",
    "contentinfo",
    "complementary",
    "search",
];

/// Elements that start and end a block.
const BLOCKS: &[&str] = &[
    "address",
    "article",
    "blockquote",
    "body",
    "caption",
    "details",
    "dialog",
    "div",
    "dl",
    "fieldset",
    "figcaption",
    "figure",
    "hr",
    "main",
    "ol",
    "p",
    "pre",
    "section",
    "summary",
    "table",
    "ul",
];

const HEADINGS: &[&str] = &["h1", "h2", "h3", "h4", "h5", "h6"];

/// The headings and paragraphs of HTML `text`.
pub fn blocks(text: &str) -> Vec<Block> {
    let page = Html::parse_document(text);
    let main = Selector::parse("main, [role=main]").expect("a valid selector");
    let mains: Vec<ElementRef> = page
        .select(&main)
        .filter(|m| {
            !m.ancestors()
                .filter_map(ElementRef::wrap)
                .any(|a| main.matches(&a))
        })
        .collect();
    let mut w = Walker::default();
    if mains.is_empty() {
        w.element(page.root_element(), false);
    } else {
        for m in mains {
            w.element(m, true);
        }
    }
    w.flush();
    w.blocks
}

/// Whether `el` is navigation or page furniture; `<header>` is kept inside an article.
fn boilerplate(el: &scraper::node::Element, in_article: bool) -> bool {
    let name = el.name();
    let hidden_style = el
        .attr("style")
        .is_some_and(|s| s.replace(' ', "").contains("display:none"));
    BOILERPLATE.contains(&name)
        || (name == "header" && !in_article)
        || el.attr("hidden").is_some()
        || el.attr("aria-hidden") == Some("true")
        || hidden_style
        || el
            .attr("role")
            .is_some_and(|r| BOILERPLATE_ROLES.contains(&r))
}

/// The blocks so far and the one being written.
#[derive(Default)]
struct Walker {
    blocks: Vec<Block>,
    text: String,
    /// Depth inside headings.
    heading: usize,
    /// Depth inside `<pre>`.
    pre: usize,
}

impl Walker {
    fn element(&mut self, el: ElementRef, in_article: bool) {
        let e = el.value();
        if boilerplate(e, in_article) {
            return;
        }
        let name = e.name();
        let in_article = in_article || name == "article" || name == "main";
        let heading = HEADINGS.contains(&name);
        let block = heading || BLOCKS.contains(&name);
        if block {
            self.flush();
        }
        match name {
            "br" | "li" | "dt" | "dd" | "tr" => self.separate("\n"),
            "td" | "th" => self.separate(" | "),
            _ => {}
        }
        if name == "li" {
            self.text.push_str("- ");
        }
        self.heading += usize::from(heading);
        self.pre += usize::from(name == "pre");
        for child in el.children() {
            match child.value() {
                Node::Text(t) if self.pre > 0 => self.text.push_str(t),
                Node::Text(t) => push_collapsed(&mut self.text, t),
                Node::Element(_) => {
                    if let Some(child) = ElementRef::wrap(child) {
                        self.element(child, in_article);
                    }
                }
                _ => {}
            }
        }
        if block {
            self.flush();
        }
        self.heading -= usize::from(heading);
        self.pre -= usize::from(name == "pre");
    }

    /// Ends the current line's text with `sep`, unless the line is empty.
    fn separate(&mut self, sep: &str) {
        self.text.truncate(self.text.trim_end_matches(' ').len());
        if !(self.text.is_empty() || self.text.ends_with('\n')) {
            self.text.push_str(sep);
        }
    }

    fn flush(&mut self) {
        push_block(&mut self.blocks, &self.text, self.heading > 0);
        self.text.clear();
    }
}
