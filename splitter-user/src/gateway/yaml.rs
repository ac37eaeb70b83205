//! YAML text as a tree of nodes that remember where they start in the source, so that every
//! error about a gateway document can name its line and column.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// A place in the source text; both numbers count from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    fn of(span: Span) -> Self {
        // The parser counts lines from 1 and columns from 0.
        Self { line: span.start.line(), column: span.start.col() + 1 }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub value: NodeValue,
    pub position: Position,
}

#[derive(Clone, Debug)]
pub enum NodeValue {
    /// A scalar's text; `quoted` when written in quotes or as a block (`|`, `>`), which makes
    /// it a string even when it reads like `null`.
    Scalar {
        text: String,
        quoted: bool,
    },
    Sequence(Vec<Node>),
    /// Entries in source order (duplicates kept: the reader reports them).
    Mapping(Vec<(Node, Node)>),
}

impl Node {
    /// A plain empty, `~` or `null` scalar (YAML's core schema null).
    pub fn is_null(&self) -> bool {
        matches!(&self.value, NodeValue::Scalar { text, quoted: false }
            if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The scalar's text, unless it is a null, a list or a mapping.
    pub fn scalar(&self) -> Option<&str> {
        match &self.value {
            NodeValue::Scalar { text, .. } if !self.is_null() => Some(text),
            _ => None,
        }
    }

    /// What the node is, for messages such as "expected a list, found a mapping".
    pub fn describe(&self) -> String {
        match &self.value {
            _ if self.is_null() => "nothing (null)".to_owned(),
            NodeValue::Scalar { text, .. } => format!("`{text}`"),
            NodeValue::Sequence(_) => "a list".to_owned(),
            NodeValue::Mapping(_) => "a mapping".to_owned(),
        }
    }
}

/// A YAML syntax error.
#[derive(Debug)]
pub struct SyntaxError {
    pub position: Position,
    pub message: String,
}

/// Parses every document of a YAML stream (documents separated by `---`).
///
/// Aliases (`*name`) are refused: gateway documents have no use for them, and expanding them
/// lets a few lines of text grow into an arbitrarily large tree.
pub fn parse_stream(text: &str) -> Result<Vec<Node>, SyntaxError> {
    let mut builder = TreeBuilder::default();
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|err| SyntaxError {
            position: Position { line: err.marker().line(), column: err.marker().col() + 1 },
            message: err.info().to_owned(),
        })?;
        builder.on_event(event, span)?;
    }
    Ok(builder.documents)
}

/// A collection being read: its start and the children read so far.
enum OpenCollection {
    Sequence { position: Position, items: Vec<Node> },
    Mapping { position: Position, entries: Vec<(Node, Node)>, key: Option<Node> },
}

#[derive(Default)]
struct TreeBuilder {
    documents: Vec<Node>,
    open: Vec<OpenCollection>,
    /// Anchored nodes by anchor id: only to tell an alias to a known anchor (refused) from
    /// one the parser did not resolve.
    anchors: HashMap<usize, Position>,
}

impl TreeBuilder {
    fn on_event(&mut self, event: Event<'_>, span: Span) -> Result<(), SyntaxError> {
        let position = Position::of(span);
        match event {
            Event::Scalar(text, style, anchor, _tag) => {
                self.remember_anchor(anchor, position);
                let quoted = style != ScalarStyle::Plain;
                self.complete(Node { value: NodeValue::Scalar { text: text.into_owned(), quoted }, position });
            }
            Event::SequenceStart(anchor, _tag) => {
                self.remember_anchor(anchor, position);
                self.open.push(OpenCollection::Sequence { position, items: Vec::new() });
            }
            Event::MappingStart(anchor, _tag) => {
                self.remember_anchor(anchor, position);
                self.open.push(OpenCollection::Mapping { position, entries: Vec::new(), key: None });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.open.pop() {
                    Some(OpenCollection::Sequence { position, items, .. }) => Node { value: NodeValue::Sequence(items), position },
                    Some(OpenCollection::Mapping { position, entries, .. }) => Node { value: NodeValue::Mapping(entries), position },
                    None => return Err(SyntaxError { position, message: "unbalanced collection end".to_owned() }),
                };
                self.complete(node);
            }
            Event::Alias(anchor) => {
                let message = match self.anchors.get(&anchor) {
                    Some(anchored) => format!("YAML aliases are not supported (this one refers to the anchor at line {})", anchored.line),
                    None => "YAML aliases are not supported".to_owned(),
                };
                return Err(SyntaxError { position, message });
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart(_) | Event::DocumentEnd => {}
        }
        Ok(())
    }

    fn remember_anchor(&mut self, anchor: usize, position: Position) {
        if anchor != 0 {
            self.anchors.insert(anchor, position);
        }
    }

    /// Adds a finished node to the collection being read, or makes it a document's root.
    fn complete(&mut self, node: Node) {
        match self.open.last_mut() {
            None => self.documents.push(node),
            Some(OpenCollection::Sequence { items, .. }) => items.push(node),
            Some(OpenCollection::Mapping { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }
}

/// Finds the node a field path such as `routes.sava/sava/sava:1.0.0/port.targets[1]` names
/// in `root`, and returns where it starts (for a mapping entry, where its key starts).
///
/// Keys may themselves contain dots, so at each mapping the longest key that matches the
/// front of the path wins.
pub fn locate(root: &Node, path: &str) -> Option<Position> {
    if path.is_empty() {
        return Some(root.position);
    }
    match &root.value {
        NodeValue::Mapping(entries) => {
            let mut best: Option<(&Node, &Node, &str)> = None;
            for (key, value) in entries {
                let Some(name) = key.scalar() else { continue };
                let Some(rest) = path.strip_prefix(name) else {
                    continue;
                };
                let rest = if rest.is_empty() || rest.starts_with('[') {
                    rest
                } else if let Some(rest) = rest.strip_prefix('.') {
                    rest
                } else {
                    continue;
                };
                if best.is_none_or(|(best_key, _, _)| best_key.scalar().map_or(0, str::len) < name.len()) {
                    best = Some((key, value, rest));
                }
            }
            let (key, value, rest) = best?;
            if rest.is_empty() {
                Some(key.position)
            } else {
                locate(value, rest)
            }
        }
        NodeValue::Sequence(items) => {
            let inner = path.strip_prefix('[')?;
            let (index, rest) = inner.split_once(']')?;
            let item = items.get(index.parse::<usize>().ok()?)?;
            locate(item, rest.strip_prefix('.').unwrap_or(rest))
        }
        NodeValue::Scalar { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_know_their_line_and_column() {
        let docs = parse_stream("a: 1\nb:\n  - x\n  - {c: d}\n").unwrap();
        assert_eq!(docs.len(), 1);
        assert_eq!(locate(&docs[0], "b"), Some(Position { line: 2, column: 1 }));
        assert_eq!(locate(&docs[0], "b[0]"), Some(Position { line: 3, column: 5 }));
        assert_eq!(locate(&docs[0], "b[1].c"), Some(Position { line: 4, column: 6 }));
        assert_eq!(locate(&docs[0], "missing"), None);
    }

    #[test]
    fn keys_with_dots_are_matched_whole() {
        let docs = parse_stream("routes:\n  a.b:\n    weight: 1\n  a:\n    weight: 2\n").unwrap();
        assert_eq!(locate(&docs[0], "routes.a.b.weight"), Some(Position { line: 3, column: 5 }));
        assert_eq!(locate(&docs[0], "routes.a.weight"), Some(Position { line: 5, column: 5 }));
    }

    #[test]
    fn documents_are_split_on_separators() {
        let docs = parse_stream("a: 1\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].position.line, 3);
    }

    #[test]
    fn quoted_null_is_a_string() {
        let docs = parse_stream("a: 'null'\nb: null\nc:\n").unwrap();
        let NodeValue::Mapping(entries) = &docs[0].value else { panic!("not a mapping") };
        assert_eq!(entries[0].1.scalar(), Some("null"));
        assert!(entries[1].1.is_null());
        assert!(entries[2].1.is_null());
    }

    #[test]
    fn syntax_errors_and_aliases_have_positions() {
        let err = parse_stream("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.position.line >= 1);
        let err = parse_stream("a: &x 1\nb: *x\n").unwrap_err();
        assert_eq!(err.position, Position { line: 2, column: 4 });
        assert!(err.message.contains("aliases"), "{}", err.message);
    }
}
