//! Which app a request goes to: among the apps whose host matches the
//! request's (or that serve any host), the one with the longest route that
//! is a prefix of the path on a segment boundary (`/api` serves `/api` and
//! `/api/users`, not `/apis`); an app for the host beats an app for any
//! host. The guest sees the whole path, prefix included.

/// One app's place in the routes.
pub struct Route<A> {
    /// The path prefix, `/` for every path, no trailing slash otherwise.
    pub route: String,
    /// The host (lowercase, no port), or `None` for any.
    pub host: Option<String>,
    pub app: A,
}

/// The routes of one version of the server's apps.
pub struct Router<A> {
    /// Ordered so that the first that serves a request is the one it goes
    /// to: apps with a host first, longer routes first.
    routes: Vec<Route<A>>,
}

impl<A> Router<A> {
    pub fn new(mut routes: Vec<Route<A>>) -> Router<A> {
        routes.sort_by(|a, b| {
            (b.host.is_some(), b.route.len()).cmp(&(a.host.is_some(), a.route.len()))
        });
        Router { routes }
    }

    /// The app for a request to `host` (without port; any case) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&A> {
        self.routes
            .iter()
            .find(|route| {
                let host_ok = match (&route.host, host) {
                    (None, _) => true,
                    (Some(wanted), Some(host)) => wanted.eq_ignore_ascii_case(host),
                    (Some(_), None) => false,
                };
                host_ok && serves(&route.route, path)
            })
            .map(|route| &route.app)
    }

    /// Every app, in routing order.
    pub fn apps(&self) -> impl Iterator<Item = &A> {
        self.routes.iter().map(|route| &route.app)
    }
}

fn serves(route: &str, path: &str) -> bool {
    route == "/"
        || path
            .strip_prefix(route)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&'static str, Option<&str>, &'static str)]) -> Router<&'static str> {
        Router::new(
            routes
                .iter()
                .map(|&(route, host, app)| Route {
                    route: route.to_string(),
                    host: host.map(str::to_string),
                    app,
                })
                .collect(),
        )
    }

    #[test]
    fn the_longest_route_on_a_segment_boundary_wins() {
        let router = router(&[
            ("/", None, "root"),
            ("/api", None, "api"),
            ("/api/v2", None, "v2"),
        ]);
        for (path, app) in [
            ("/", "root"),
            ("/index.html", "root"),
            ("/api", "api"),
            ("/api/users", "api"),
            ("/apis", "root"),
            ("/api/v2", "v2"),
            ("/api/v2/x", "v2"),
            ("/api/v20", "api"),
        ] {
            assert_eq!(router.route(None, path), Some(&app), "{path}");
        }
    }

    #[test]
    fn an_app_for_the_host_beats_one_for_any_host() {
        let router = router(&[
            ("/", None, "any"),
            ("/", Some("admin.example"), "admin"),
            ("/api", None, "api"),
        ]);
        assert_eq!(
            router.route(Some("ADMIN.example"), "/api/x"),
            Some(&"admin")
        );
        assert_eq!(router.route(Some("other.example"), "/api/x"), Some(&"api"));
        assert_eq!(router.route(None, "/x"), Some(&"any"));
    }

    #[test]
    fn a_request_no_app_serves_has_no_route() {
        let router = router(&[("/api", None, "api"), ("/", Some("a.example"), "a")]);
        assert_eq!(router.route(Some("b.example"), "/"), None);
        assert_eq!(router.route(None, "/ap"), None);
        assert_eq!(router.apps().count(), 2);
    }
}
