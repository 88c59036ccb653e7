//! A small GraphQL executor: real parsing (graphql-parser), variables, fragments, aliases,
//! and projection of fully built JSON entities through a query's selection set.
//!
//! There is no schema: each root field has a resolver that builds its whole entity as JSON,
//! and [`project`] keeps what the query selected (fields it does not know come back null).
//! Fields with arguments below the root (`lowestPrice(input: {gpuCount: 2})`) are computed
//! by a hook the resolver passes in.

use std::collections::HashMap;

use graphql_parser::query::{
    Definition, Document, Field, FragmentDefinition, OperationDefinition, Selection, SelectionSet,
    Value as GValue, VariableDefinition,
};
use serde_json::{Map, Value};

/// Computes a field (with its arguments) instead of reading it from the parent object.
pub type FieldHook<'h> =
    dyn Fn(&Map<String, Value>, &str, &Map<String, Value>) -> Option<Value> + 'h;

/// Query or mutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Query,
    Mutation,
}

impl Kind {
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Query => "Query",
            Self::Mutation => "Mutation",
        }
    }
}

/// A parsed request: the operation to run, its variables and the document's fragments.
pub struct Request<'a> {
    pub kind: Kind,
    pub selection: &'a SelectionSet<'a, &'a str>,
    pub vars: Map<String, Value>,
    fragments: HashMap<&'a str, &'a FragmentDefinition<'a, &'a str>>,
}

/// Parses a document (syntax errors carry the parser's message).
pub fn parse(text: &str) -> Result<Document<'_, &str>, String> {
    graphql_parser::parse_query::<&str>(text).map_err(|e| e.to_string().trim().to_string())
}

impl<'a> Request<'a> {
    /// Picks the operation (by name when several) and resolves its variables.
    pub fn new(
        doc: &'a Document<'a, &'a str>,
        operation_name: Option<&str>,
        provided: &Map<String, Value>,
    ) -> Result<Self, String> {
        let mut fragments = HashMap::new();
        let mut ops = Vec::new();
        for def in &doc.definitions {
            match def {
                Definition::Fragment(f) => {
                    fragments.insert(f.name, f);
                }
                Definition::Operation(o) => ops.push(o),
            }
        }
        let op = pick_operation(&ops, operation_name)?;
        let (kind, selection, defs): (Kind, _, &[VariableDefinition<'a, &'a str>]) = match op {
            OperationDefinition::SelectionSet(s) => (Kind::Query, s, &[]),
            OperationDefinition::Query(q) => {
                (Kind::Query, &q.selection_set, &q.variable_definitions)
            }
            OperationDefinition::Mutation(m) => {
                (Kind::Mutation, &m.selection_set, &m.variable_definitions)
            }
            OperationDefinition::Subscription(_) => {
                return Err("Subscriptions are not supported.".into());
            }
        };
        Ok(Self {
            kind,
            selection,
            vars: variables(defs, provided),
            fragments,
        })
    }

    /// The fields of a selection set with fragments expanded (type conditions are not
    /// checked: every entity here has one type).
    pub fn fields(&self, set: &'a SelectionSet<'a, &'a str>) -> Vec<&'a Field<'a, &'a str>> {
        let mut out = Vec::new();
        self.collect(set, &mut out, 0);
        out
    }

    fn collect(
        &self,
        set: &'a SelectionSet<'a, &'a str>,
        out: &mut Vec<&'a Field<'a, &'a str>>,
        depth: u32,
    ) {
        if depth > 32 {
            return;
        }
        for sel in &set.items {
            match sel {
                Selection::Field(f) => out.push(f),
                Selection::InlineFragment(i) => self.collect(&i.selection_set, out, depth + 1),
                Selection::FragmentSpread(s) => {
                    if let Some(f) = self.fragments.get(s.fragment_name) {
                        self.collect(&f.selection_set, out, depth + 1);
                    }
                }
            }
        }
    }

    /// A field's arguments as JSON, variables substituted.
    pub fn args(&self, field: &Field<'a, &'a str>) -> Map<String, Value> {
        field
            .arguments
            .iter()
            .map(|(k, v)| (k.to_string(), to_json(v, &self.vars)))
            .collect()
    }

    /// Keeps from `value` what `set` selects. `hook(parent, field, args)` may compute a
    /// field instead of reading it from the parent object.
    pub fn project(
        &self,
        value: &Value,
        set: &'a SelectionSet<'a, &'a str>,
        hook: &FieldHook<'_>,
    ) -> Value {
        match value {
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.project(v, set, hook)).collect())
            }
            Value::Object(obj) => {
                let mut out = Map::new();
                for f in self.fields(set) {
                    let key = f.alias.unwrap_or(f.name).to_string();
                    let raw = if f.name == "__typename" {
                        obj.get("__typename")
                            .cloned()
                            .unwrap_or_else(|| Value::String("Object".into()))
                    } else {
                        hook(obj, f.name, &self.args(f))
                            .unwrap_or_else(|| obj.get(f.name).cloned().unwrap_or(Value::Null))
                    };
                    let v = if f.selection_set.items.is_empty() {
                        raw
                    } else {
                        self.project(&raw, &f.selection_set, hook)
                    };
                    out.insert(key, v);
                }
                Value::Object(out)
            }
            other => other.clone(),
        }
    }
}

/// The operation to run: the one named `operation_name`, else the only one.
fn pick_operation<'a>(
    ops: &[&'a OperationDefinition<'a, &'a str>],
    operation_name: Option<&str>,
) -> Result<&'a OperationDefinition<'a, &'a str>, String> {
    let name_of = |o: &OperationDefinition<'a, &'a str>| -> Option<&'a str> {
        match o {
            OperationDefinition::Query(q) => q.name,
            OperationDefinition::Mutation(m) => m.name,
            OperationDefinition::Subscription(s) => s.name,
            OperationDefinition::SelectionSet(_) => None,
        }
    };
    match operation_name.filter(|n| !n.is_empty()) {
        Some(name) => ops
            .iter()
            .find(|o| name_of(o) == Some(name))
            .copied()
            .ok_or_else(|| format!("Unknown operation named \"{name}\".")),
        None if ops.len() == 1 => Ok(ops[0]),
        None if ops.is_empty() => Err("No operation in the document.".into()),
        None => Err("Must provide operation name if query contains multiple operations.".into()),
    }
}

/// The operation's variables: as provided, else their default, else null.
fn variables<'a>(
    defs: &[VariableDefinition<'a, &'a str>],
    provided: &Map<String, Value>,
) -> Map<String, Value> {
    let mut vars = Map::new();
    for d in defs {
        let v = match provided.get(d.name) {
            Some(v) => v.clone(),
            None => d
                .default_value
                .as_ref()
                .map(|dv| to_json(dv, &Map::new()))
                .unwrap_or(Value::Null),
        };
        vars.insert(d.name.to_string(), v);
    }
    vars
}

/// A GraphQL literal as JSON; enum literals become strings, variables their values.
pub fn to_json<'a>(v: &GValue<'a, &'a str>, vars: &Map<String, Value>) -> Value {
    match v {
        GValue::Variable(name) => vars.get(*name).cloned().unwrap_or(Value::Null),
        GValue::Int(n) => n.as_i64().map(Value::from).unwrap_or(Value::Null),
        GValue::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        GValue::String(s) => Value::String(s.clone()),
        GValue::Boolean(b) => Value::Bool(*b),
        GValue::Null => Value::Null,
        GValue::Enum(e) => Value::String((*e).to_string()),
        GValue::List(items) => Value::Array(items.iter().map(|i| to_json(i, vars)).collect()),
        GValue::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| ((*k).to_string(), to_json(v, vars)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn no_hook(_: &Map<String, Value>, _: &str, _: &Map<String, Value>) -> Option<Value> {
        None
    }

    #[test]
    fn inline_literals_enums_and_nested_selection() {
        let doc = parse(r#"mutation { podFindAndDeployOnDemand(input: {name: "a", cloudType: ALL, gpuCount: 2, env: [{key: "K", value: "V"}], dataCenterId: null}) { id machine { podHostId } } }"#).unwrap();
        let req = Request::new(&doc, None, &Map::new()).unwrap();
        assert_eq!(req.kind, Kind::Mutation);
        let f = req.fields(req.selection)[0];
        let args = req.args(f);
        assert_eq!(
            args["input"],
            json!({"name": "a", "cloudType": "ALL", "gpuCount": 2, "env": [{"key": "K", "value": "V"}], "dataCenterId": null})
        );
        let entity =
            json!({"id": "p1", "name": "a", "machine": {"podHostId": "h", "location": "x"}});
        let out = req.project(&entity, &f.selection_set, &no_hook);
        assert_eq!(out, json!({"id": "p1", "machine": {"podHostId": "h"}}));
    }

    #[test]
    fn variables_aliases_fragments_and_defaults() {
        let doc = parse(
            r#"query Q($id: String!, $n: Int = 3) { p: pod(input: {podId: $id}) { ...F other: name n2: gpuCount } }
               fragment F on Pod { id }"#,
        )
        .unwrap();
        let req = Request::new(
            &doc,
            Some("Q"),
            &json!({"id": "x"}).as_object().cloned().unwrap(),
        )
        .unwrap();
        assert_eq!(req.vars["n"], json!(3));
        let f = req.fields(req.selection)[0];
        assert_eq!(f.alias, Some("p"));
        assert_eq!(req.args(f)["input"], json!({"podId": "x"}));
        let out = req.project(
            &json!({"id": "x", "name": "nm", "gpuCount": 1}),
            &f.selection_set,
            &no_hook,
        );
        assert_eq!(out, json!({"id": "x", "other": "nm", "n2": 1}));
    }

    #[test]
    fn syntax_errors_and_unknown_operation_names_are_reported() {
        assert!(parse("query { pod(input: {podId: }) { id }").is_err());
        let doc = parse("query A { a } query B { b }").unwrap();
        assert!(Request::new(&doc, None, &Map::new()).is_err());
        assert!(Request::new(&doc, Some("C"), &Map::new()).is_err());
        assert!(Request::new(&doc, Some("B"), &Map::new()).is_ok());
    }
}
