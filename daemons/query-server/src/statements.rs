//! Trino's metadata statements (`SHOW CATALOGS`, `SHOW SCHEMAS`, `SHOW TABLES`, `DESCRIBE`,
//! `USE`) as the engine answers them from the Iceberg catalog: told apart, with their names and
//! `LIKE` patterns, from the statement's tokens before DataFusion plans anything.

use datafusion::sql::sqlparser::{
    dialect::GenericDialect,
    tokenizer::{Token, Tokenizer},
};

use crate::protocol::{ErrorCode, Failure};

/// The statements answered here rather than by DataFusion, read from the tokens.
#[derive(Debug, PartialEq)]
pub enum Meta {
    ShowCatalogs {
        like: Option<String>,
    },
    ShowSchemas {
        catalog: Option<String>,
        like: Option<String>,
    },
    ShowTables {
        schema: Vec<String>,
        like: Option<String>,
    },
    Describe {
        table: Vec<String>,
    },
    Use {
        path: Vec<String>,
    },
}

/// SQL `LIKE` with `%` and `_`, as SHOW ... LIKE uses it.
pub fn like_match(pattern: &str, value: &str) -> bool {
    fn go(p: &[char], v: &[char]) -> bool {
        match p.split_first() {
            None => v.is_empty(),
            Some(('%', rest)) => (0..=v.len()).any(|i| go(rest, &v[i..])),
            Some(('_', rest)) => !v.is_empty() && go(rest, &v[1..]),
            Some((c, rest)) => v.first() == Some(c) && go(rest, &v[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let v: Vec<char> = value.chars().collect();
    go(&p, &v)
}

/// A token of the statement: a word (unquoted ones lower-cased, as Trino folds them), a
/// string literal, or a symbol.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Word {
    Keyword(String),
    Quoted(String),
    Text(String),
    Symbol(String),
}

impl Word {
    fn is(&self, keyword: &str) -> bool {
        matches!(self, Word::Keyword(k) if k == keyword)
    }

    fn name(&self) -> Option<String> {
        match self {
            Word::Keyword(k) => Some(k.clone()),
            Word::Quoted(q) => Some(q.clone()),
            _ => None,
        }
    }
}

pub(crate) fn words(sql: &str) -> Result<Vec<Word>, Failure> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql)
        .tokenize()
        .map_err(|e| Failure::new(ErrorCode::SyntaxError, e.to_string()))?;
    Ok(tokens
        .into_iter()
        .filter_map(|t| match t {
            Token::Whitespace(_) | Token::SemiColon | Token::EOF => None,
            Token::Word(w) if w.quote_style.is_some() => Some(Word::Quoted(w.value)),
            Token::Word(w) => Some(Word::Keyword(w.value.to_lowercase())),
            Token::SingleQuotedString(s) => Some(Word::Text(s)),
            other => Some(Word::Symbol(other.to_string())),
        })
        .collect())
}

/// `a.b.c` from the start of `words`, and what follows it.
pub(crate) fn dotted(words: &[Word]) -> Option<(Vec<String>, &[Word])> {
    let mut parts = vec![words.first()?.name()?];
    let mut rest = &words[1..];
    while let [Word::Symbol(dot), next, tail @ ..] = rest {
        if dot != "." {
            break;
        }
        parts.push(next.name()?);
        rest = tail;
    }
    Some((parts, rest))
}

/// `[LIKE 'pattern']` and nothing after it.
pub(crate) fn like(words: &[Word]) -> Result<Option<String>, Failure> {
    match words {
        [] => Ok(None),
        [l, Word::Text(p)] if l.is("like") => Ok(Some(p.clone())),
        _ => Err(Failure::new(
            ErrorCode::SyntaxError,
            "expected LIKE 'pattern' or the end of the statement",
        )),
    }
}

pub(crate) fn meta(words: &[Word]) -> Result<Option<Meta>, Failure> {
    let from = |w: &Word| w.is("from") || w.is("in");
    let syntax = |what: &str| Failure::new(ErrorCode::SyntaxError, format!("expected {what}"));
    Ok(Some(match words {
        [show, catalogs, rest @ ..] if show.is("show") && catalogs.is("catalogs") => {
            Meta::ShowCatalogs { like: like(rest)? }
        }
        [show, schemas, rest @ ..] if show.is("show") && schemas.is("schemas") => match rest {
            [f, catalog, rest @ ..] if from(f) => Meta::ShowSchemas {
                catalog: Some(catalog.name().ok_or_else(|| syntax("a catalog name"))?),
                like: like(rest)?,
            },
            rest => Meta::ShowSchemas {
                catalog: None,
                like: like(rest)?,
            },
        },
        [show, tables, rest @ ..] if show.is("show") && tables.is("tables") => match rest {
            [f, rest @ ..] if from(f) => {
                let (schema, rest) = dotted(rest).ok_or_else(|| syntax("a schema name"))?;
                Meta::ShowTables {
                    schema,
                    like: like(rest)?,
                }
            }
            rest => Meta::ShowTables {
                schema: vec![],
                like: like(rest)?,
            },
        },
        [show, columns, f, rest @ ..] if show.is("show") && columns.is("columns") && from(f) => {
            let (table, rest) = dotted(rest).ok_or_else(|| syntax("a table name"))?;
            like(rest)?;
            Meta::Describe { table }
        }
        [describe, rest @ ..] if describe.is("describe") || describe.is("desc") => {
            let (table, rest) = dotted(rest).ok_or_else(|| syntax("a table name"))?;
            if !rest.is_empty() {
                return Err(syntax("the end of the statement after the table name"));
            }
            Meta::Describe { table }
        }
        [use_, rest @ ..] if use_.is("use") => {
            let (path, rest) = dotted(rest).ok_or_else(|| syntax("[catalog.]schema"))?;
            if !rest.is_empty() {
                return Err(syntax("the end of the statement after the schema"));
            }
            Meta::Use { path }
        }
        [show, ..] if show.is("show") => {
            return Err(Failure::new(
                ErrorCode::NotSupported,
                "SHOW supports CATALOGS, SCHEMAS, TABLES and COLUMNS here",
            ));
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(sql: &str) -> Option<Meta> {
        meta(&words(sql).expect("tokens")).expect("meta")
    }

    #[test]
    fn trino_metadata_statements_are_recognised() {
        assert_eq!(parsed("SHOW CATALOGS"), Some(Meta::ShowCatalogs { like: None }));
        assert_eq!(
            parsed("show schemas from iceberg"),
            Some(Meta::ShowSchemas {
                catalog: Some("iceberg".into()),
                like: None
            })
        );
        assert_eq!(
            parsed("SHOW TABLES FROM iceberg.default LIKE 'w%';"),
            Some(Meta::ShowTables {
                schema: vec!["iceberg".into(), "default".into()],
                like: Some("w%".into())
            })
        );
        assert_eq!(
            parsed("DESCRIBE iceberg.\"default\".Weather"),
            Some(Meta::Describe {
                table: vec!["iceberg".into(), "default".into(), "weather".into()]
            })
        );
        assert_eq!(
            parsed("USE iceberg.default"),
            Some(Meta::Use {
                path: vec!["iceberg".into(), "default".into()]
            })
        );
        assert_eq!(parsed("SELECT 1"), None);
        assert!(meta(&words("SHOW FUNCTIONS").expect("tokens")).is_err());
        assert!(meta(&words("DESCRIBE weather extra").expect("tokens")).is_err());
    }

    #[test]
    fn like_patterns() {
        assert!(like_match("w%", "weather"));
        assert!(like_match("_eather", "weather"));
        assert!(!like_match("w_", "weather"));
        assert!(like_match("%", ""));
    }
}
