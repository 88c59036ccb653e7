//! REST v2 GPU catalogue (`/v2/catalog/gpus[/{id}]`) from the simulator's GPU types:
//! per-GPU list prices per cloud, per-cloud ceilings, and with `include=AVAILABILITY`
//! (which needs `product`) the stock the next create would meet, overall and per data
//! center. Every machine reports CUDA 12.8, which is what the CUDA filters compare with.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    response::Response,
};
use serde_json::{Value, json};

use super::{
    super::{
        config::GpuTypeSpec,
        pods::unit_price,
        state::{Sim, State as SimState},
    },
    Call, bad_request,
    check::is_version,
    not_found, ok, unprocessable,
};

/// The CUDA version every simulated host reports.
pub const HOST_CUDA: (u32, u32) = (12, 8);

/// The availability part of a catalogue query, when `include=AVAILABILITY` asked for it.
struct Availability {
    count: u32,
    cloud: String,
    countries: Vec<String>,
    /// Whether the hosts' CUDA version passes the CUDA filters.
    cuda_ok: bool,
}

/// The query's filters, checked: malformed values are 422, filters without
/// `include=AVAILABILITY` (or the include without `product`) are 400.
fn availability_query(call: &Call) -> Result<Option<Availability>, Response> {
    let q = |k: &str| call.query(k).filter(|v| !v.is_empty());
    let list = |k: &str| -> Vec<String> {
        q(k).map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    };
    let mut errors = Vec::new();
    let include = list("include");
    if include.len() > 1 || include.iter().any(|i| i != "AVAILABILITY") {
        errors.push("$.include: value must be AVAILABILITY".to_string());
    }
    let products = list("product");
    if products
        .iter()
        .any(|p| !["POD", "CLUSTER", "SERVERLESS"].contains(&p.as_str()))
    {
        errors.push("$.product: values must be POD, CLUSTER or SERVERLESS".into());
    }
    let count = match q("count").map(str::parse::<u32>) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => {
            errors.push("$.count: must be an integer >= 1".into());
            1
        }
    };
    let cloud = q("cloud").unwrap_or("SECURE").to_string();
    if !["SECURE", "COMMUNITY"].contains(&cloud.as_str()) {
        errors.push("$.cloud: value must be SECURE or COMMUNITY".into());
    }
    let countries = list("countryCodes");
    if countries
        .iter()
        .any(|c| c.len() != 2 || !c.bytes().all(|b| b.is_ascii_uppercase()))
    {
        errors.push("$.countryCodes: entries must match ^[A-Z]{2}$".into());
    }
    let versions = list("cudaVersions");
    if versions.iter().any(|v| !is_version(v)) {
        errors.push("$.cudaVersions: entries must match ^\\d+\\.\\d+$".into());
    }
    let min_cuda = q("minCudaVersion").map(parse_min_version);
    if matches!(min_cuda, Some(None)) {
        errors.push("$.minCudaVersion: must match ^\\d+(\\.\\d+)?$".into());
    }
    if !errors.is_empty() {
        return Err(unprocessable(&errors));
    }
    let wanted = !include.is_empty();
    let filters = [
        "count",
        "cloud",
        "countryCodes",
        "cudaVersions",
        "minCudaVersion",
    ];
    if !wanted {
        if !products.is_empty() || filters.iter().any(|f| q(f).is_some()) {
            return Err(bad_request(
                "product, count, cloud, countryCodes and the CUDA filters are valid only with include=AVAILABILITY",
            ));
        }
        return Ok(None);
    }
    if products.is_empty() {
        return Err(bad_request("include=AVAILABILITY requires product"));
    }
    if !versions.is_empty() && min_cuda.is_some() {
        return Err(bad_request(
            "cudaVersions and minCudaVersion are mutually exclusive",
        ));
    }
    let host = format!("{}.{}", HOST_CUDA.0, HOST_CUDA.1);
    let cuda_ok = (versions.is_empty() || versions.contains(&host))
        && min_cuda.flatten().is_none_or(|min| min <= HOST_CUDA);
    Ok(Some(Availability {
        count,
        cloud,
        countries,
        cuda_ok,
    }))
}

/// `12` or `12.1` as (major, minor); a bare major means any release of it.
fn parse_min_version(s: &str) -> Option<(u32, u32)> {
    match s.split_once('.') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => Some((s.parse().ok()?, 0)),
    }
}

/// The availability level of `free` GPUs for a pod of `count`.
fn level(free: u32, count: u32) -> &'static str {
    match free {
        f if f < count => "NONE",
        0..=2 => "LOW",
        3..=7 => "MEDIUM",
        _ => "HIGH",
    }
}

/// The country of a RunPod data center id: `US-TX-3` is in the US, `EU-RO-1` in Romania,
/// `EUR-IS-1` in Iceland (a leading `EU`/`EUR` names the region, not the country).
fn country(data_center: &str) -> &str {
    let mut parts = data_center.split('-');
    match (parts.next(), parts.next()) {
        (Some("EU" | "EUR"), Some(c)) => c,
        (Some(c), _) => c,
        _ => data_center,
    }
}

/// `NVIDIA`, `AMD` or `UNKNOWN` from the type's id.
fn manufacturer(t: &GpuTypeSpec) -> &'static str {
    let id = t.id.to_ascii_uppercase();
    if id.starts_with("NVIDIA") {
        "NVIDIA"
    } else if id.starts_with("AMD") {
        "AMD"
    } else {
        "UNKNOWN"
    }
}

/// The `GpuType` of `t`; `None` when a country filter leaves it nowhere (list only).
fn gpu_type(
    st: &SimState,
    t: &GpuTypeSpec,
    a: Option<&Availability>,
    single: bool,
) -> Option<Value> {
    let ceiling = |p: Option<f64>| if p.is_some() { t.max_gpu_count } else { 0 };
    let mut price = json!({
        "secure": t.secure_price.unwrap_or(0.0),
        "community": t.community_price.unwrap_or(0.0),
    });
    let pool = st.pool_of(&t.id);
    if let Some(p) = pool.and_then(|p| p.price) {
        price["serverless"] = json!(p);
    }
    let mut v = json!({
        "id": t.id,
        "name": t.display_name,
        "pool": pool.map(|p| &p.id),
        "manufacturer": manufacturer(t),
        "memory": t.memory_in_gb,
        "secure": t.secure_price.is_some(),
        "community": t.community_price.is_some(),
        "price": price,
        "maxCount": {"secure": ceiling(t.secure_price), "community": ceiling(t.community_price)},
    });
    let Some(a) = a else {
        return Some(v);
    };
    let places: Vec<&str> = st
        .data_centers_of(&t.id)
        .into_iter()
        .filter(|d| a.countries.is_empty() || a.countries.iter().any(|c| c == country(d)))
        .collect();
    if places.is_empty() && !single {
        return None;
    }
    let fits = a.cuda_ok
        && unit_price(t, &a.cloud).is_some()
        && a.count <= t.max_gpu_count
        && !places.is_empty();
    let overall = if fits {
        level(st.gpus_free(t), a.count)
    } else {
        "NONE"
    };
    v["availability"] = json!(overall);
    if overall != "NONE" {
        v["dataCenters"] = places
            .iter()
            .map(|d| json!({"id": d, "name": d, "availability": overall}))
            .collect();
        let (major, minor) = HOST_CUDA;
        v["cudaVersions"] = json!([{"version": format!("{major}.{minor}"), "available": true}]);
    }
    Some(v)
}

pub async fn list(State(sim): State<Arc<Sim>>, call: Call) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.listGpuTypes").await {
        return r;
    }
    let a = match availability_query(&call) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let st = sim.lock();
    let gpus: Vec<Value> = st
        .gpu_types
        .iter()
        .filter_map(|t| gpu_type(&st, t, a.as_ref(), false))
        .collect();
    ok(&json!({"gpus": gpus}))
}

pub async fn show(State(sim): State<Arc<Sim>>, call: Call, Path(id): Path<String>) -> Response {
    if let Err(r) = call.gate(&sim, "runpod.v2.getGpuType").await {
        return r;
    }
    let a = match availability_query(&call) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let st = sim.lock();
    st.gpu_types
        .iter()
        .find(|t| t.id == id)
        .and_then(|t| gpu_type(&st, t, a.as_ref(), true))
        .map_or_else(|| not_found(format!("GPU type {id} not found")), |v| ok(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_free_stock_and_the_count_asked_for() {
        assert_eq!(level(0, 1), "NONE");
        assert_eq!(level(2, 1), "LOW");
        assert_eq!(level(5, 1), "MEDIUM");
        assert_eq!(level(8, 1), "HIGH");
        assert_eq!(level(3, 4), "NONE");
    }

    #[test]
    fn data_center_ids_name_their_country() {
        assert_eq!(country("US-TX-3"), "US");
        assert_eq!(country("EU-RO-1"), "RO");
        assert_eq!(country("EUR-IS-1"), "IS");
        assert_eq!(country("CA-MTL-1"), "CA");
    }

    #[test]
    fn min_cuda_takes_a_bare_major() {
        assert_eq!(parse_min_version("12"), Some((12, 0)));
        assert_eq!(parse_min_version("12.9"), Some((12, 9)));
        assert_eq!(parse_min_version("x"), None);
        assert!(parse_min_version("13").unwrap() > HOST_CUDA);
    }
}
