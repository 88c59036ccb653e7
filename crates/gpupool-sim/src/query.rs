//! Vast-style filters and ordering over JSON rows (`{"field": {"op": value}}`), used for
//! offer search and for the v1 instance list.
//!
//! The official CLI sends most filter values as strings (`{"num_gpus": {"eq": "1"}}`) and GPU
//! names with spaces while the docs send numbers and underscores (`RTX_4090`), so values are
//! coerced to the type of the row's field before comparing.

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// Field names whose string values compare loosely (underscores as spaces, any case).
fn loose(field: &str) -> bool {
    matches!(field, "gpu_name" | "gpu_arch" | "cpu_arch")
}

fn norm(field: &str, s: &str) -> String {
    if loose(field) {
        s.replace('_', " ").to_lowercase()
    } else {
        s.to_string()
    }
}

/// `want` converted to the JSON type of `actual` where that makes sense.
fn coerce(actual: &Value, want: &Value) -> Value {
    match (actual, want) {
        (Value::Number(_), Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| want.clone()),
        (Value::Bool(_), Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => want.clone(),
        },
        (Value::Bool(_), Value::Number(n)) => Value::Bool(n.as_f64().is_some_and(|f| f != 0.0)),
        (Value::Number(_), Value::Bool(b)) => Value::from(u8::from(*b)),
        (Value::String(_), Value::Number(n)) => Value::String(n.to_string()),
        (Value::String(_), Value::Bool(b)) => Value::String(b.to_string()),
        _ => want.clone(),
    }
}

fn equal(field: &str, actual: &Value, want: &Value) -> bool {
    let want = coerce(actual, want);
    match (actual, &want) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(a), Value::String(b)) => {
            if field == "geolocation" {
                // "Oregon, US" matches "US" (the filter takes a country code) and itself.
                let code = a.rsplit(", ").next().unwrap_or(a);
                a.eq_ignore_ascii_case(b) || code.eq_ignore_ascii_case(b)
            } else {
                norm(field, a) == norm(field, b)
            }
        }
        _ => *actual == want,
    }
}

/// Orders two JSON values: null < bool < number < string < others (by text).
pub fn compare(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            _ => 4,
        }
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => rank(a)
            .cmp(&rank(b))
            .then_with(|| a.to_string().cmp(&b.to_string())),
    }
}

fn ordered(actual: &Value, want: &Value, ok: fn(Ordering) -> bool) -> bool {
    let want = coerce(actual, want);
    match (actual, &want) {
        (Value::Number(_), Value::Number(_)) | (Value::String(_), Value::String(_)) => {
            ok(compare(actual, &want))
        }
        _ => false,
    }
}

/// Whether `actual` satisfies `op want`. Unknown operators are an error (the API says 400).
pub fn test(field: &str, actual: &Value, op: &str, want: &Value) -> Result<bool, String> {
    let list = |w: &Value| -> Vec<Value> {
        match w {
            Value::Array(items) => items.clone(),
            Value::String(s) => s
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|x| Value::String(x.trim().to_string()))
                .collect(),
            other => vec![other.clone()],
        }
    };
    Ok(match op {
        "eq" => equal(field, actual, want),
        "neq" => !equal(field, actual, want),
        "gt" => ordered(actual, want, |o| o == Ordering::Greater),
        "gte" => ordered(actual, want, |o| o != Ordering::Less),
        "lt" => ordered(actual, want, |o| o == Ordering::Less),
        "lte" => ordered(actual, want, |o| o != Ordering::Greater),
        "in" => list(want).iter().any(|w| equal(field, actual, w)),
        "notin" => !list(want).iter().any(|w| equal(field, actual, w)),
        other => return Err(format!("unknown operator {other:?} on {field}")),
    })
}

/// Whether a row passes one `field: {op: value, ...}` condition. A bare value means `eq`.
pub fn passes(field: &str, actual: &Value, cond: &Value) -> Result<bool, String> {
    match cond {
        Value::Object(ops) => {
            for (op, want) in ops {
                if !test(field, actual, op, want)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        bare => test(field, actual, "eq", bare),
    }
}

/// Sorts rows by `keys` (field, descending?) with `id` ascending as the final tie-break.
pub fn sort_rows(rows: &mut [Map<String, Value>], keys: &[(String, bool)]) {
    rows.sort_by(|a, b| row_cmp(a, b, keys));
}

/// The order `sort_rows` uses.
pub fn row_cmp(
    a: &Map<String, Value>,
    b: &Map<String, Value>,
    keys: &[(String, bool)],
) -> Ordering {
    for (field, desc) in keys {
        let o = compare(
            a.get(field).unwrap_or(&Value::Null),
            b.get(field).unwrap_or(&Value::Null),
        );
        let o = if *desc { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    compare(
        a.get("id").unwrap_or(&Value::Null),
        b.get("id").unwrap_or(&Value::Null),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cli_strings_are_coerced_to_the_field_type() {
        assert!(passes("num_gpus", &json!(1), &json!({"eq": "1"})).unwrap());
        assert!(passes("num_gpus", &json!(2), &json!({"gte": "2", "lt": 4})).unwrap());
        assert!(!passes("num_gpus", &json!(2), &json!({"gt": "2"})).unwrap());
        assert!(passes("rentable", &json!(true), &json!({"eq": "true"})).unwrap());
        assert!(passes("dph_total", &json!(0.4), &json!({"lte": 0.5})).unwrap());
    }

    #[test]
    fn gpu_names_and_countries_match_loosely() {
        assert!(passes("gpu_name", &json!("RTX 4090"), &json!({"eq": "RTX_4090"})).unwrap());
        assert!(
            passes(
                "gpu_name",
                &json!("RTX 4090"),
                &json!({"in": ["RTX_3090", "rtx 4090"]})
            )
            .unwrap()
        );
        assert!(
            passes(
                "geolocation",
                &json!("Oregon, US"),
                &json!({"in": ["US", "CA"]})
            )
            .unwrap()
        );
        assert!(
            passes(
                "geolocation",
                &json!("Oregon, US"),
                &json!({"notin": ["DE"]})
            )
            .unwrap()
        );
        assert!(!passes("label", &json!("a_b"), &json!({"eq": "a b"})).unwrap());
    }

    #[test]
    fn null_in_a_list_matches_unlabeled_rows() {
        assert!(passes("label", &Value::Null, &json!({"in": [null, "x"]})).unwrap());
        assert!(!passes("label", &json!("y"), &json!({"in": [null, "x"]})).unwrap());
    }

    #[test]
    fn unknown_operators_are_refused() {
        assert!(passes("id", &json!(1), &json!({"like": 1})).is_err());
    }

    #[test]
    fn rows_sort_by_keys_then_id() {
        let mut rows: Vec<Map<String, Value>> = [
            json!({"id": 3, "p": 1.0}),
            json!({"id": 1, "p": 2.0}),
            json!({"id": 2, "p": 1.0}),
        ]
        .into_iter()
        .filter_map(|v| v.as_object().cloned())
        .collect();
        sort_rows(&mut rows, &[("p".into(), false)]);
        let ids: Vec<_> = rows.iter().map(|r| r["id"].clone()).collect();
        assert_eq!(ids, vec![json!(2), json!(3), json!(1)]);
    }
}
