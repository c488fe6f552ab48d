//! Route: which destinations an envelope goes to. Pure; built once from validated config.

use crate::config::ValidRoute;
use crate::normalise::Envelope;

#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<ValidRoute>,
}

/// Destinations (deduplicated, first match first) and the names of the routes that matched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDecision {
    pub destinations: Vec<String>,
    pub routes: Vec<String>,
}

impl Router {
    pub fn new(routes: Vec<ValidRoute>) -> Self {
        Self { routes }
    }

    pub fn route(&self, env: &Envelope) -> RouteDecision {
        let mut out = RouteDecision::default();
        for r in self.routes.iter().filter(|r| matches(r, env)) {
            out.routes.push(r.name.clone());
            for d in &r.destinations {
                if !out.destinations.contains(d) {
                    out.destinations.push(d.clone());
                }
            }
        }
        out
    }
}

/// Empty lists match anything; an event without a tenant never matches a tenant-restricted route.
fn matches(r: &ValidRoute, env: &Envelope) -> bool {
    (r.vendors.is_empty() || r.vendors.iter().any(|v| v == &env.vendor))
        && (r.categories.is_empty() || r.categories.contains(&env.category))
        && (r.priorities.is_empty() || r.priorities.contains(&env.priority))
        && (r.tenants.is_empty() || env.tenant.as_ref().is_some_and(|t| r.tenants.contains(t)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalise::{Category, Priority};

    fn env(vendor: &str, category: Category, tenant: Option<&str>) -> Envelope {
        Envelope {
            id: "e".into(),
            vendor: vendor.into(),
            vendor_event_id: None,
            category,
            priority: Priority::Normal,
            tenant: tenant.map(str::to_string),
            key: "patient:1".into(),
            mapping_version: "1".into(),
            fhir: "{}".into(),
        }
    }

    fn route(
        name: &str,
        categories: Vec<Category>,
        tenants: &[&str],
        dests: &[&str],
    ) -> ValidRoute {
        ValidRoute {
            name: name.into(),
            vendors: vec![],
            categories,
            tenants: tenants.iter().map(|s| s.to_string()).collect(),
            priorities: vec![],
            destinations: dests.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn fans_out_and_deduplicates() {
        let r = Router::new(vec![
            route("alarms", vec![Category::Alarm], &[], &["rsc", "epj"]),
            route("oslo", vec![], &["0301"], &["epj", "pmd"]),
        ]);
        let d = r.route(&env("a", Category::Alarm, Some("0301")));
        assert_eq!(d.destinations, vec!["rsc", "epj", "pmd"]);
        assert_eq!(d.routes, vec!["alarms", "oslo"]);
        let d = r.route(&env("a", Category::Measurement, None));
        assert!(d.destinations.is_empty());
        let d = r.route(&env("a", Category::Measurement, Some("4601")));
        assert!(d.destinations.is_empty());
    }
}
