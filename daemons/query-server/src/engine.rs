//! From SQL text to a stream of record batches: Trino's `SHOW`, `DESCRIBE` and `USE` answered
//! from the Iceberg catalog, `SELECT` and `EXPLAIN` planned by DataFusion over the tables the
//! catalog has at that moment. Nothing else is accepted: the server is read-only.

use std::{collections::HashMap, sync::Arc};

use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use datafusion::{
    catalog::SchemaProvider,
    execution::{
        SendableRecordBatchStream, SessionStateBuilder,
        disk_manager::{DiskManagerBuilder, DiskManagerMode},
        runtime_env::RuntimeEnvBuilder,
    },
    physical_plan::{displayable, execute_stream, stream::RecordBatchStreamAdapter},
    prelude::{SQLOptions, SessionConfig, SessionContext},
    sql::{
        parser::{DFParser, Statement as DfStatement},
        sqlparser::{
            ast::{Expr as SqlExpr, SelectItem, SetExpr, Statement as SqlStatement},
            dialect::GenericDialect,
        },
    },
};
use futures::TryStreamExt;
use iceberg::{Catalog, NamespaceIdent, TableIdent};

use crate::{
    Metrics,
    catalog::{CATALOG, IcebergCatalog, IcebergSchema},
    errors::{failure, iceberg_failure, not_found_schema, table_not_found},
    functions,
    grouping::GroupOnDictionary,
    history::Entry,
    protocol::{ErrorCode, Failure},
    statements::{Meta, like_match, meta, words},
    tables::{self, Loaded, Tables},
};

/// Who asks, and where unqualified names point (`X-Trino-Catalog`, `X-Trino-Schema`).
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub user: String,
    pub catalog: Option<String>,
    pub schema: Option<String>,
}

/// Session changes a statement makes (`USE`), which its responses carry as headers.
#[derive(Debug, Clone, Default)]
pub struct SessionUpdate {
    pub set_catalog: Option<String>,
    pub set_schema: Option<String>,
}

/// What a statement gives: its rows, and for `USE` the session it sets.
pub struct Outcome {
    pub stream: SendableRecordBatchStream,
    /// Result column names where they differ from the stream's (Trino's `_col0` for an
    /// unnamed expression).
    pub names: Option<Vec<String>>,
    pub session: SessionUpdate,
    pub update_type: Option<&'static str>,
}

impl Outcome {
    /// Rows and nothing else.
    fn rows(stream: SendableRecordBatchStream) -> Self {
        Self {
            stream,
            names: None,
            session: SessionUpdate::default(),
            update_type: None,
        }
    }
}

pub struct Engine {
    pub catalog: Arc<dyn Catalog>,
    pub tables: Arc<Tables>,
    pub memory_limit: usize,
    pub target_partitions: usize,
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// Plans `sql` and starts it; its plan and what its scans read go to `entry`.
    pub async fn run(&self, sql: &str, session: &Session, entry: Option<&Entry>) -> Result<Outcome, Failure> {
        let tokens = words(sql)?;
        if let Some(meta) = meta(&tokens)? {
            return self.meta(meta, session).await;
        }
        let mut statements = DFParser::parse_sql_with_dialect(sql, &GenericDialect {})
            .map_err(|e| Failure::new(ErrorCode::SyntaxError, e.to_string()))?;
        let statement = match (statements.pop_front(), statements.is_empty()) {
            (Some(statement), true) => statement,
            (None, _) => return Err(Failure::new(ErrorCode::SyntaxError, "no statement given")),
            (Some(_), false) => return Err(Failure::new(ErrorCode::SyntaxError, "one statement at a time")),
        };
        let names = match &statement {
            DfStatement::Statement(s) if matches!(s.as_ref(), SqlStatement::Query(_)) => trino_names(s),
            DfStatement::Explain(explain) if matches!(explain.statement.as_ref(), DfStatement::Statement(s) if matches!(s.as_ref(), SqlStatement::Query(_))) => {
                None
            }
            _ => return Err(read_only()),
        };
        let explain = matches!(statement, DfStatement::Explain(_));
        let ctx = self.context(session, entry).await?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = ctx.sql_with_options(sql, options).await.map_err(failure)?;
        // As DataFrame::execute_stream, with the plan kept for the query's page.
        let task = Arc::new(frame.task_ctx());
        let plan = frame.create_physical_plan().await.map_err(failure)?;
        if let Some(entry) = entry {
            entry.set_plan(&displayable(plan.as_ref()).indent(true).to_string());
        }
        let stream = execute_stream(plan, task).map_err(failure)?;
        if explain {
            return Ok(Outcome::rows(explain_text(stream).await?));
        }
        let names = names.filter(|n| n.len() == stream.schema().fields().len());
        Ok(Outcome {
            names,
            ..Outcome::rows(stream)
        })
    }

    /// A DataFusion session over the catalog as it is now, with Trino's functions and this
    /// query's memory limit.
    async fn context(&self, session: &Session, entry: Option<&Entry>) -> Result<SessionContext, Failure> {
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(
                session.catalog.as_deref().unwrap_or(CATALOG),
                session.schema.as_deref().unwrap_or("default"),
            )
            // information_schema.tables and .columns, which SQLAlchemy and BI tools read.
            .with_information_schema(true)
            .with_target_partitions(self.target_partitions);
        if let Some(entry) = entry {
            // The table scans report what they read to it (see `scan.rs`).
            config = config.with_extension(Arc::new(entry.clone()));
        }
        // No spilling: the memory limit is a limit, and a query never fills the disk.
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(self.memory_limit, 1.0)
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
            .build_arc()
            .map_err(failure)?;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(GroupOnDictionary))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let layout = self.tables.layout().await?;
        let mut schemas = HashMap::new();
        for stored in &layout.namespaces {
            let tables = layout
                .tables
                .iter()
                .filter(|t| &t.namespace == stored)
                .map(|t| (tables::identifier(stored, &t.name), t.metadata_location.clone()))
                .collect();
            schemas.insert(
                tables::namespace(stored).to_url_string(),
                Arc::new(IcebergSchema {
                    loaded: self.tables.clone(),
                    tables,
                    metrics: self.metrics.clone(),
                }) as Arc<dyn SchemaProvider>,
            );
        }
        ctx.register_catalog(CATALOG, Arc::new(IcebergCatalog { schemas }));
        functions::register(&ctx);
        Ok(ctx)
    }

    async fn meta(&self, meta: Meta, session: &Session) -> Result<Outcome, Failure> {
        let names = |header: &str, values: Vec<String>, like: &Option<String>| {
            let values: Vec<String> = values
                .into_iter()
                .filter(|v| like.as_ref().is_none_or(|p| like_match(p, v)))
                .collect();
            one_column(header, values)
        };
        let batch = match &meta {
            Meta::ShowCatalogs { like } => names("Catalog", vec![CATALOG.to_owned()], like),
            Meta::ShowSchemas { catalog, like } => {
                self.check_catalog(catalog.as_deref().or(session.catalog.as_deref()))?;
                let schemas = self.catalog.list_namespaces(None).await.map_err(iceberg_failure)?;
                let mut schemas: Vec<String> = schemas.iter().map(|n| n.to_url_string()).collect();
                schemas.push("information_schema".to_owned());
                schemas.sort();
                names("Schema", schemas, like)
            }
            Meta::ShowTables { schema, like } => {
                let namespace = self.namespace(schema, session)?;
                let tables = self
                    .catalog
                    .list_tables(&namespace)
                    .await
                    .map_err(|e| not_found_schema(e, &namespace))?;
                let mut tables: Vec<String> = tables.into_iter().map(|t| t.name).collect();
                tables.sort();
                names("Table", tables, like)
            }
            Meta::Describe { table } => self.describe(table, session).await,
            Meta::Use { path } => {
                let (catalog, schema) = match path.as_slice() {
                    [schema] => (
                        session.catalog.clone().unwrap_or_else(|| CATALOG.to_owned()),
                        schema.clone(),
                    ),
                    [catalog, schema] => (catalog.clone(), schema.clone()),
                    _ => return Err(Failure::new(ErrorCode::SyntaxError, "USE takes [catalog.]schema")),
                };
                self.check_catalog(Some(&catalog))?;
                let namespace = NamespaceIdent::new(schema.clone());
                if !self
                    .catalog
                    .namespace_exists(&namespace)
                    .await
                    .map_err(iceberg_failure)?
                {
                    return Err(Failure::new(
                        ErrorCode::SchemaNotFound,
                        format!("Schema '{schema}' does not exist"),
                    ));
                }
                return Ok(Outcome {
                    session: SessionUpdate {
                        set_catalog: Some(catalog),
                        set_schema: Some(schema),
                    },
                    update_type: Some("USE"),
                    ..Outcome::rows(stream_of(Arc::new(Schema::empty()), vec![]))
                });
            }
        }?;
        Ok(Outcome::rows(stream_of(batch.schema(), vec![batch])))
    }

    fn check_catalog(&self, catalog: Option<&str>) -> Result<(), Failure> {
        match catalog {
            Some(name) if name != CATALOG => Err(Failure::new(
                ErrorCode::CatalogNotFound,
                format!("Catalog '{name}' not found"),
            )),
            _ => Ok(()),
        }
    }

    /// `[catalog.]schema`, completed from the session.
    fn namespace(&self, path: &[String], session: &Session) -> Result<NamespaceIdent, Failure> {
        let (catalog, schema) = match path {
            [] => (session.catalog.clone(), session.schema.clone()),
            [schema] => (session.catalog.clone(), Some(schema.clone())),
            [catalog, schema] => (Some(catalog.clone()), Some(schema.clone())),
            _ => return Err(Failure::new(ErrorCode::SyntaxError, "too many parts in a schema name")),
        };
        self.check_catalog(catalog.as_deref())?;
        let schema = schema.ok_or_else(|| {
            Failure::new(
                ErrorCode::GenericUserError,
                "Schema must be specified when session schema is not set",
            )
        })?;
        Ok(NamespaceIdent::new(schema))
    }

    /// Trino's `DESCRIBE`: Column, Type, Extra, Comment.
    async fn describe(&self, path: &[String], session: &Session) -> Result<RecordBatch, Failure> {
        let (schema, name) = match path.split_last() {
            Some((name, schema)) => (schema, name),
            None => return Err(Failure::new(ErrorCode::SyntaxError, "DESCRIBE needs a table")),
        };
        let namespace = self.namespace(schema, session)?;
        let ident = TableIdent::new(namespace, name.clone());
        let table = self
            .catalog
            .load_table(&ident)
            .await
            .map_err(|_| table_not_found(&ident))?;
        let schema = Loaded::new(table).map_err(iceberg_failure)?.schema;
        let column = |values: Vec<String>| Arc::new(StringArray::from(values)) as ArrayRef;
        let fields = schema.fields();
        RecordBatch::try_new(
            Arc::new(Schema::new(
                ["Column", "Type", "Extra", "Comment"]
                    .map(|n| Field::new(n, DataType::Utf8, false))
                    .to_vec(),
            )),
            vec![
                column(fields.iter().map(|f| f.name().clone()).collect()),
                column(
                    fields
                        .iter()
                        .map(|f| crate::protocol::trino_type(f.data_type()).0)
                        .collect(),
                ),
                column(vec![String::new(); fields.len()]),
                column(vec![String::new(); fields.len()]),
            ],
        )
        .map_err(|e| failure(e.into()))
    }
}

fn read_only() -> Failure {
    Failure::new(
        ErrorCode::NotSupported,
        "This server is read-only: it runs SELECT, SHOW, DESCRIBE, EXPLAIN and USE",
    )
}

fn one_column(header: &str, values: Vec<String>) -> Result<RecordBatch, Failure> {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new(header, DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(values))],
    )
    .map_err(|e| failure(e.into()))
}

fn stream_of(schema: SchemaRef, batches: Vec<RecordBatch>) -> SendableRecordBatchStream {
    Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::iter(batches.into_iter().map(Ok)),
    ))
}

/// Trino's EXPLAIN: one row, one `Query Plan` column.
async fn explain_text(stream: SendableRecordBatchStream) -> Result<SendableRecordBatchStream, Failure> {
    let batches: Vec<RecordBatch> = stream.try_collect().await.map_err(failure)?;
    let mut text = String::new();
    for batch in &batches {
        let rows = crate::protocol::rows(batch);
        for row in rows {
            let [kind, plan] = row.as_slice() else { continue };
            text.push_str(&format!(
                "{}:\n{}\n",
                kind.as_str().unwrap_or(""),
                plan.as_str().unwrap_or("")
            ));
        }
    }
    let batch = one_column("Query Plan", vec![text])?;
    Ok(stream_of(batch.schema(), vec![batch]))
}

/// Trino names a result column by its alias or column name, and `_colN` otherwise, where
/// DataFusion would name it by its expression (`avg(weather.temperature)`).
fn trino_names(statement: &SqlStatement) -> Option<Vec<String>> {
    let SqlStatement::Query(query) = statement else {
        return None;
    };
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    select
        .projection
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            SelectItem::ExprWithAlias { alias, .. } => Some(normalize(alias)),
            SelectItem::UnnamedExpr(SqlExpr::Identifier(ident)) => Some(normalize(ident)),
            SelectItem::UnnamedExpr(SqlExpr::CompoundIdentifier(parts)) => parts.last().map(normalize),
            SelectItem::UnnamedExpr(_) => Some(format!("_col{i}")),
            // A wildcard's columns are named by the table; leave every name to DataFusion.
            _ => None,
        })
        .collect()
}

fn normalize(ident: &datafusion::sql::sqlparser::ast::Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnamed_expressions_are_named_as_trino_names_them() {
        let mut statements = DFParser::parse_sql_with_dialect(
            "SELECT city, AVG(CAST(temperature AS DOUBLE)) as avg_temp, count(*), w.\"TS\" FROM weather w GROUP BY city",
            &GenericDialect {},
        )
        .expect("parsed");
        let Some(DfStatement::Statement(statement)) = statements.pop_front() else {
            panic!("not a statement")
        };
        assert_eq!(
            trino_names(&statement),
            Some(vec!["city".into(), "avg_temp".into(), "_col2".into(), "TS".into()])
        );
    }
}
